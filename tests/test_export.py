"""`python -m raycap.data export-world`: the world as real files (PNG images, Karpathy JSON, an open_clip model
directory for the retriever), and `Retriever.load` on every kind of retriever."""
import json
import os

import numpy as np
import open_clip
import pytest
import torch

from raycap.data.__main__ import main
from raycap.data.export import image_array, image_path
from raycap.data.world import World, WorldConfig
from raycap.errors import UserError
from raycap.models.clip import Retriever

CAPTIONS = ["a red circle", "a large blue square at top left and a small green star at bottom", "some shapes",
            "a shape at center"]


@pytest.fixture(scope="module")
def exported(tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "world-files"
    summary = main(["export-world", "--out", str(out), "--world-dir", str(tiny_world_dir), "--workers", "2"])
    return out, summary


@pytest.fixture(scope="module")
def world(tiny_world_dir):
    return World(WorldConfig.parse(json.loads((tiny_world_dir / "world.json").read_text())))


def test_files_and_karpathy_json(exported, world):
    out, summary = exported
    c = world.config
    assert sorted(p.name for p in out.iterdir()) == [".raycap-export.json", "README.txt", "dataset_world.json", "images",
                                                     "retriever"]
    assert summary["images"] == {"train": c.n_train, "val": c.n_val, "test": c.n_test}
    assert summary["written"] == c.n_train + c.n_val + c.n_test
    for split, n in summary["images"].items():
        assert sorted(p.name for p in (out / "images" / split).iterdir()) == [f"{i:06d}.png" for i in range(n)]

    data = json.loads((out / "dataset_world.json").read_text())
    assert data["dataset"] == "world"
    assert WorldConfig.model_validate(data["world"]) == c  # the world config round-trips
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * c.n_train + ["val"] * c.n_val + ["test"] * c.n_test
    assert [im["imgid"] for im in images] == list(range(len(images)))
    sentids = [s for im in images for s in im["sentids"]]
    assert sentids == list(range(len(sentids)))
    assert sum(im["labelled"] for im in images) == c.n_labelled
    for im in images:
        split, index = im["split"], im["world_index"]
        assert (im["filepath"], im["filename"]) == (f"images/{split}", f"{index:06d}.png")
        assert (out / im["filepath"] / im["filename"]).is_file()
        assert im["labelled"] == (split == "train" and index < c.n_labelled)
        refs = world.references(split, index)
        assert len(im["sentences"]) == 5
        assert [s["raw"] for s in im["sentences"]] == refs
        assert [s["tokens"] for s in im["sentences"]] == [r.split() for r in refs]
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
    assert [im["world_index"] for im in images if im["split"] == "val"] == list(range(c.n_val))

    readme = (out / "README.txt").read_text().splitlines()
    assert len(readme) == 2 and readme[1].startswith("Written by: python -m raycap.data export-world --out ")


def test_png_pixels_equal_the_world(exported, world):
    out, summary = exported
    for split, n in summary["images"].items():
        files = np.stack([image_array(image_path(out, split, i)) for i in range(n)])
        assert files.dtype == np.uint8
        np.testing.assert_array_equal(files, world.images(split))


def test_retriever_is_an_open_clip_model_dir(exported, tiny_world_dir, world):
    out, _ = exported
    rdir = out / "retriever"
    cfg = json.loads((rdir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "raycap-world"
    assert cfg["preprocess_cfg"]["interpolation"] == "bicubic" and cfg["preprocess_cfg"]["resize_mode"] == "shortest"
    assert (rdir / "open_clip_model.safetensors").is_file() and (rdir / "tokenizer.json").is_file()

    ref = Retriever.load(path=str(tiny_world_dir / "retriever")).freeze()
    model = open_clip.create_model(f"local-dir:{rdir}")
    theirs, ours = model.state_dict(), ref.model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    exp = Retriever.load(path=str(rdir)).freeze()
    assert exp.meta["source"] == "open_clip" and exp.meta["name"] == f"local-dir:{rdir}"
    assert exp.meta["mean"] == cfg["preprocess_cfg"]["mean"] and exp.meta["std"] == cfg["preprocess_cfg"]["std"]
    assert torch.equal(exp.tokenize(CAPTIONS), ref.tokenize(CAPTIONS))
    text = ref.encode_captions(CAPTIONS)
    torch.testing.assert_close(exp.encode_captions(CAPTIONS), text, atol=1e-6, rtol=0)
    files = np.stack([image_array(image_path(out, "test", i)) for i in range(32)])
    pixels = ref.encode_pixels(world.images("test", range(32)))
    torch.testing.assert_close(exp.encode_pixels(files), pixels, atol=1e-6, rtol=0)

    # open_clip alone (its tokenizer from the directory, its transform on the PNG files) agrees too
    tok = open_clip.get_tokenizer(f"local-dir:{rdir}")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{rdir}")
    from PIL import Image

    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.encode_text(tok(CAPTIONS), normalize=True), text, atol=1e-6, rtol=0)
        x = torch.stack([preprocess(Image.open(image_path(out, "test", i))) for i in range(32)])
        torch.testing.assert_close(model.encode_image(x, normalize=True), pixels, atol=1e-6, rtol=0)


def test_saved_open_clip_dir_retriever_is_self_contained(exported, tmp_path):
    import shutil

    out, _ = exported
    src = tmp_path / "oc"
    shutil.copytree(out / "retriever", src)
    a = Retriever.from_open_clip(f"local-dir:{src}").freeze()
    a.save_pretrained(tmp_path / "saved")
    shutil.rmtree(src)  # the saved retriever must not need the directory it came from
    b = Retriever.from_pretrained(tmp_path / "saved").freeze()
    assert b.meta["source"] == "open_clip" and type(b.tokenizer) is type(a.tokenizer)
    torch.testing.assert_close(b.encode_captions(CAPTIONS), a.encode_captions(CAPTIONS), atol=1e-6, rtol=0)
    assert b.model.visual.preprocess_cfg["mean"] == a.model.visual.preprocess_cfg["mean"]


def test_resume_skips_existing_images(tiny_world_dir, tmp_path, world):
    out = tmp_path / "w"
    args = ["export-world", "--out", str(out), "--world-dir", str(tiny_world_dir), "--splits", "val,train",
            "--max-train", "30", "--workers", "1"]
    first = main(args)
    assert first["images"] == {"train": 30, "val": world.config.n_val} and first["written"] == 30 + world.config.n_val
    assert not (out / "images" / "test").exists()
    data = json.loads((out / "dataset_world.json").read_text())
    assert [im["split"] for im in data["images"]][:31] == ["train"] * 30 + ["val"]  # train first, whatever --splits says

    kept = image_path(out, "train", 5)
    os.utime(kept, (1, 1))
    image_path(out, "val", 3).unlink()
    image_path(out, "train", 7).write_bytes(b"not a png")  # a damaged file is rewritten
    (out / "dataset_world.json").unlink()
    again = main(args[:-1] + ["2"])
    assert again["written"] == 2
    assert kept.stat().st_mtime == 1
    np.testing.assert_array_equal(image_array(image_path(out, "train", 7)), world.image("train", 7))
    np.testing.assert_array_equal(image_array(image_path(out, "val", 3)), world.image("val", 3))
    assert json.loads((out / "dataset_world.json").read_text()) == data  # the JSON is rewritten
    assert not list(out.rglob("*.tmp"))


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_one_line_exit_2(capsys, tmp_path, tiny_world_dir, exported):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "exists and is not a directory" in _error(capsys, ["export-world", "--out", str(a_file)])
    err = _error(capsys, ["export-world", "--out", str(tmp_path / "o"), "--world-dir", str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in err
    err = _error(capsys, ["export-world", "--out", str(tmp_path / "o"), "--world-dir", str(tmp_path)])
    assert "world.json" in err
    assert "labelled" in _error(capsys, ["export-world", "--out", str(tmp_path / "o"), "--splits", "labelled"])
    assert "--max-train" in _error(capsys, ["export-world", "--out", str(tmp_path / "o"), "--world-dir",
                                            str(tiny_world_dir), "--max-train", "0"])
    # an export of another world (the shipped one) is not resumed into
    out, _ = exported
    assert "different world" in _error(capsys, ["export-world", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main(["export-world", "--help"])
    assert e.value.code == 0 and "--max-train" in capsys.readouterr().out


def test_retriever_load_dispatch_and_errors(exported, tiny_world_dir, tmp_path):
    out, _ = exported
    assert Retriever.load(path=str(tiny_world_dir / "retriever")).meta["source"] == "config"
    assert Retriever.load(name=f"local-dir:{out / 'retriever'}").meta["source"] == "open_clip"
    (tmp_path / "empty").mkdir()
    (tmp_path / "f.pt").write_bytes(b"")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((out / "retriever" / "open_clip_config.json").read_text())
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "open_clip_config.json").write_text("{")
    no_tokenizer = tmp_path / "notokenizer"  # names a HF tokenizer, but its files are not there
    no_tokenizer.mkdir()
    for f in ("open_clip_config.json", "open_clip_model.safetensors"):
        (no_tokenizer / f).write_bytes((out / "retriever" / f).read_bytes())
    cases = [
        (dict(path=str(no_tokenizer)), "notokenizer"),
        (dict(path=str(tmp_path / "missing")), "missing"),
        (dict(path=str(tmp_path / "empty")), "empty"),
        (dict(path=str(tmp_path / "f.pt")), "f.pt"),
        (dict(path=str(no_weights)), "noweights"),
        (dict(path=str(bad_json)), "badjson"),
        (dict(path=str(tiny_world_dir / "retriever"), name="ViT-B-32"), "retriever"),
        (dict(name="ViT-B-32", pretrained=str(tmp_path / "nope.pt")), "nope.pt"),
        (dict(name=f"local-dir:{out / 'retriever'}", pretrained="openai"), "local-dir:"),
        (dict(name=f"local-dir:{tmp_path / 'missing'}"), "missing"),
        (dict(name="no-such-model"), "no-such-model"),
        ({}, "path"),
    ]
    for kwargs, named in cases:
        with pytest.raises(UserError) as e:
            Retriever.load(**kwargs)
        assert named in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))
