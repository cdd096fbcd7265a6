"""`python -m raycap.caption`: captions for image files of any size and mode; a bad file gets one line and the
others are still captioned."""
import json

import numpy as np
import pytest
from PIL import Image

from raycap.caption import main
from raycap.data.world import World, WorldConfig


def test_captions_files_of_any_size_and_mode_and_reports_bad_ones(tmp_path, capsys):
    world = World(WorldConfig())
    exact = tmp_path / "exact.png"
    Image.fromarray(world.image("test", 0)).save(exact)
    big = tmp_path / "big.jpg"
    Image.fromarray(world.image("test", 1)).resize((200, 150)).save(big)
    gray = tmp_path / "gray.png"
    Image.fromarray(world.image("test", 2)).convert("L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([world.image("test", 3), np.full((48, 48), 255, np.uint8)])).save(rgba)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SystemExit) as e:
        main([str(exact), str(broken), str(big), str(gray), str(rgba), str(tmp_path / "absent.png"), "--json"])
    out = capsys.readouterr()
    assert e.value.code == 1
    results = json.loads(out.out)
    assert [r["image"] for r in results] == [str(p) for p in (exact, big, gray, rgba)]
    assert all(r["caption"] for r in results)
    errors = out.err.strip().splitlines()
    assert len(errors) == 2 and "broken.jpg: cannot read image" in errors[0] and "absent.png" in errors[1]
    # the shipped captioner on a world image at its native size captions it as evaluation does (greedy)
    from raycap.data.cache import world_image_embeddings
    from raycap.inputs import load_captioner
    from raycap.models.clip import Retriever
    from raycap.models.tokenizers import decode
    from raycap.config import WORLD_DIR

    captioner, tok = load_captioner(WORLD_DIR / "captioner")
    emb = world_image_embeddings(Retriever.load(path=str(WORLD_DIR / "retriever")), world, "test", 1)
    g = captioner.eval().generate(emb, mode="greedy")
    assert results[0]["caption"] == decode(tok, g.tokens, g.lengths, captioner.stop_ids)[0]
