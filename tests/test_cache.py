"""The image-embedding cache: the Ray Data builder equals the in-process one, entries are keyed by dataset,
retriever and preprocessing (a change rebuilds), shards + manifest, and unreadable images error or are skipped."""
import json
import os

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from raycap.data.cache import MANIFEST, image_embeddings
from raycap.data.sources import BadImage, FileSource, Record
from raycap.data.world import World, WorldConfig
from raycap.models.clip import Retriever
from raycap.models.tokenizers import world_tokenizer

WORLD = World(WorldConfig(n_train=40, n_val=10, n_test=10))


def retriever(seed=0):
    torch.manual_seed(seed)
    return Retriever.for_world(world_tokenizer(WORLD.config.vocabulary())).eval()


def files(tmp_path, n=12):
    records = []
    for i in range(n):
        path = tmp_path / "imgs" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(WORLD.image("train", i)).save(path)
        records.append(Record(str(i), path))
    return FileSource("test:files", records, labelled=False)


@pytest.fixture(scope="module")
def ray_cpu():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_ray_and_local_builders_agree_and_the_second_call_reads_the_cache(tmp_path, ray_cpu, capfd):
    src, r = files(tmp_path), retriever()
    built = image_embeddings(r, src, builder="ray", batch_size=5, log=lambda *_: None)
    err = capfd.readouterr().err  # raycap's progress lines, not Ray Data's operator logs
    assert "image embeddings of test:files: 12/12 (100%)" in err
    assert "Execution plan" not in err and "Running Dataset" not in err and "Progress bars" not in err, err
    local = image_embeddings(r, src, builder="local", use_cache=False)
    assert built.built and built.embeddings.shape == (12, 64)
    assert torch.allclose(built.embeddings, local.embeddings, atol=1e-6)
    again = image_embeddings(r, src, log=lambda *_: None)
    assert not again.built and torch.equal(again.embeddings, built.embeddings) and again.path == built.path
    manifest = json.loads((built.path / MANIFEST).read_text())
    assert manifest["n"] == 12 and manifest["builder"] == "ray" and manifest["dataset"]["kind"] == "files"


def test_a_changed_file_or_retriever_rebuilds(tmp_path):
    src, r = files(tmp_path, 4), retriever()
    first = image_embeddings(r, src, builder="local", log=lambda *_: None)
    assert image_embeddings(r, src, builder="local").path == first.path
    path = src.records[2].path
    Image.fromarray(WORLD.image("train", 30)).save(path)  # new content
    os.utime(path, ns=(1, 1))  # and another mtime, whatever the file system's clock resolution
    changed = image_embeddings(r, src, builder="local")
    assert changed.built and changed.path != first.path
    assert not torch.allclose(changed.embeddings[2], first.embeddings[2])
    other = image_embeddings(retriever(seed=1), src, builder="local")
    assert other.built and other.path not in (first.path, changed.path)


def test_shards_and_manifest(tmp_path):
    src = files(tmp_path, 7)
    out = image_embeddings(retriever(), src, builder="local", shard_rows=3, log=lambda *_: None)
    manifest = json.loads((out.path / MANIFEST).read_text())
    assert manifest["shards"] == ["part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    assert all((out.path / s).is_file() for s in manifest["shards"]) and out.embeddings.shape[0] == 7
    assert not [p for p in out.path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.parametrize("builder", ["local", "ray"])
def test_unreadable_images_error_by_name_or_are_skipped(tmp_path, builder, request):
    if builder == "ray":
        request.getfixturevalue("ray_cpu")
    src, r = files(tmp_path, 6), retriever()
    src.records[4].path.write_bytes(b"\x89PNG truncated")
    with pytest.raises(BadImage) as e:
        image_embeddings(r, src, builder=builder, batch_size=2, log=lambda *_: None)
    msg = str(e.value)
    assert "004.png" in msg and "on_bad_image: skip" in msg and "\n" not in msg
    out = image_embeddings(r, src, builder=builder, on_bad_image="skip", batch_size=2, log=lambda *_: None)
    assert out.kept.tolist() == [0, 1, 2, 3, 5] and [s["id"] for s in out.skipped] == ["4"]
    full = image_embeddings(r, files(tmp_path / "clean", 6), builder="local", use_cache=False)
    assert torch.allclose(out.embeddings, full.embeddings[[0, 1, 2, 3, 5]], atol=1e-6)
    with pytest.raises(BadImage):  # a cache built while skipping never serves a run that must not skip
        image_embeddings(r, src, builder=builder, log=lambda *_: None)


def test_patch_tokens_have_their_own_entry_and_both_builders_agree(tmp_path, ray_cpu):
    """features="tokens": the image tower's tokens (what a token-reading captioner sees), float16, in an
    entry of their own (the embeddings' entry is untouched), equal from the Ray Data and in-process builders."""
    src, r = files(tmp_path, 6), retriever()
    emb = image_embeddings(r, src, builder="local", log=lambda *_: None)
    tok = image_embeddings(r, src, builder="ray", batch_size=4, log=lambda *_: None, features="tokens")
    assert tok.path != emb.path and tok.built
    assert tok.embeddings.shape == (6, *r.token_shape) == (6, 37, 96) and tok.embeddings.dtype == torch.float16
    with torch.no_grad():
        direct = r.encode_image_tokens(torch.stack([r.preprocess()(src.image(i)) for i in range(6)]))
    torch.testing.assert_close(tok.embeddings.float(), direct, atol=2e-3, rtol=1e-3)
    local = image_embeddings(r, src, builder="local", use_cache=False, features="tokens")
    torch.testing.assert_close(local.embeddings.float(), tok.embeddings.float(), atol=2e-3, rtol=1e-3)
    again = image_embeddings(r, src, log=lambda *_: None, features="tokens")
    assert not again.built and torch.equal(again.embeddings, tok.embeddings)
    assert json.loads((tok.path / MANIFEST).read_text())["shape"] == [37, 96]
    assert torch.equal(image_embeddings(r, src, log=lambda *_: None).embeddings, emb.embeddings)


def test_the_encoder_takes_a_read_only_batch_without_a_warning(tmp_path, ray_cpu):
    """Ray Data may hand an actor a read-only view of its block; torch would warn on it (and on a write)."""
    import warnings

    from raycap.data.cache import _decode, _Encode

    r = retriever()
    pixels, ok, reasons = _decode(files(tmp_path, n=3), r.preprocess(), range(3))
    pixels.setflags(write=False)
    encoder = _Encode(ray.put(r))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = encoder({"index": np.arange(3), "pixels": pixels, "ok": ok, "reason": np.asarray(reasons, object)})
    assert out["embedding"].shape == (3, 64) and not pixels.flags.writeable
