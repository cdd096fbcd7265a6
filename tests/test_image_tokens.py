"""A ClipCap that reads the retriever's image tokens (`image_input: tokens`) end to end on the tiny world: the
supervised stage trains one, a run fine-tunes it (its rollouts and learner read the tokens from the cache), `raycap.evaluate` and `raycap.caption` use it, and a retriever with other tokens is refused in
one line."""
import json

import pytest
import torch
from PIL import Image
from conftest import TINY

from raycap.caption import main as caption_main
from raycap.evaluate import main as evaluate_main
from raycap.inputs import check_compatible
from raycap.errors import UserError
from raycap.models.clipcap import ClipCap
from raycap.pretrain import main as pretrain_main
from world_runs import records, run


@pytest.fixture(scope="module")
def token_world(tiny_world_dir, tmp_path_factory):
    """The tiny world's retriever with a captioner that reads its tokens."""
    out = tmp_path_factory.mktemp("tokens") / "world"
    pretrain_main(["world", "--out", str(out), "--retriever", str(tiny_world_dir / "retriever"),
                   "--captioner-input", "tokens", "--mapper-layers", "1", *TINY])
    return out


def test_the_supervised_stage_builds_a_token_reader(token_world):
    captioner = ClipCap.from_pretrained(token_world / "captioner")
    assert captioner.reads_image_tokens and captioner.config.mapper == "transformer"
    assert (captioner.config.clip_length, captioner.config.clip_dim) == (37, 96)
    assert "faithful" in json.loads((token_world / "metrics.json").read_text())["captioner"]


def test_a_run_fine_tunes_it_and_the_tools_read_it(token_world, tmp_path, capsys):
    out = tmp_path / "run"
    final = run(token_world, out, "--set", "rl.steps=2", "--set", "eval.every=2", runtime="local")
    assert final["updates"] == 2 and "eval" in records(out)[-1]
    tuned = ClipCap.from_pretrained(out / "final")
    start = ClipCap.from_pretrained(token_world / "captioner")
    assert tuned.reads_image_tokens
    assert any(not torch.equal(a, b) for a, b in zip(tuned.mapper.state_dict().values(),
                                                     start.mapper.state_dict().values()))
    evaluate_main(["--captioner", str(out / "final"), "--world-dir", str(token_world), "--images", "100",
                   "--json", str(tmp_path / "eval.json")])
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["faithful"] <= 1
    from raycap.data.world import World, WorldConfig

    image = tmp_path / "scene.png"
    Image.fromarray(World(WorldConfig()).image("test", 0)).save(image)
    capsys.readouterr()
    caption_main([str(image), "--captioner", str(out / "final"), "--retriever", str(token_world / "retriever"),
                  "--json"])
    assert json.loads(capsys.readouterr().out)[0]["caption"]


def test_a_retriever_with_other_tokens_is_refused_in_one_line(token_world):
    from raycap.models.clip import Retriever
    from raycap.models.tokenizers import world_tokenizer
    from raycap.data.world import WorldConfig

    captioner = ClipCap.from_pretrained(token_world / "captioner")
    other = Retriever.for_world(world_tokenizer(WorldConfig().vocabulary()), image_size=32)  # 4x4 patches
    with pytest.raises(UserError, match=r"^cap reads 37 image tokens of width 96 but the retriever r gives 17 "
                                        r"of width 96; use a captioner trained on this retriever's tokens$"):
        check_compatible(captioner, other, "cap", "r")
