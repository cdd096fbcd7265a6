"""The real-data path on files raycap writes itself: the exported world (PNG files, Karpathy JSON, the retriever
as an open_clip model dir) read through the Karpathy reader and embedded by the Ray Data cache gives the
in-memory world's embeddings, scenes and run."""
import json

import pytest
import torch

from raycap.config import load_config
from raycap.data.__main__ import main as data_main
from raycap.inputs import load_retriever, open_splits
from raycap.train import main as train_main
from world_runs import FAST, world_sets


@pytest.fixture(scope="module")
def exported(tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "world-files"
    data_main(["export-world", "--out", str(out), "--world-dir", str(tiny_world_dir), "--workers", "2"])
    return out


def file_sets(world, files):
    return [f"data.path={files}/dataset_world.json", f"retriever.path={files}/retriever",
            f"captioner.path={world}/captioner"]


def test_files_give_the_in_memory_worlds_embeddings_and_scenes(tiny_world_dir, exported):
    memory = load_config("world-demo", world_sets(tiny_world_dir))
    files = load_config("world-files", file_sets(tiny_world_dir, exported))
    a = open_splits(memory, load_retriever(memory.retriever), log=lambda *_: None)
    b = open_splits(files, load_retriever(files.retriever), log=lambda *_: None)  # Ray Data builds these
    for role in ("train", "val", "test"):
        assert len(a[role].source) == len(b[role].source) and not b[role].skipped
        assert torch.allclose(a[role].embeddings, b[role].embeddings, atol=1e-6), role
        assert [s.full_description for s in a[role].source.scenes] == \
            [s.full_description for s in b[role].source.scenes]
        assert b[role].source.references(3) == a[role].source.references(3)


def test_world_files_run_equals_the_in_memory_run(tiny_world_dir, exported, tmp_path):
    common = ["--runtime", "local", *FAST, "--set", "rl.steps=3", "--set", "eval.every=3"]
    memory = train_main(["--config", "world-demo", "--out", str(tmp_path / "memory"), *common,
                         *[x for s in world_sets(tiny_world_dir) for x in ("--set", s)]])
    files = train_main(["--config", "world-files", "--out", str(tmp_path / "files"), *common,
                        *[x for s in file_sets(tiny_world_dir, exported) for x in ("--set", s)]])
    recs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("memory", "files")]
    for a, b in zip(*recs):
        for key in ("reward_mean", "train_p_at_1", "loss", "kl", "example"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5) if isinstance(a[key], float) else a[key] == b[key]
        if "eval" in a:
            assert a["eval"]["p_at_1"] == pytest.approx(b["eval"]["p_at_1"], abs=1e-9)
            assert a["eval"]["faithful"] == pytest.approx(b["eval"]["faithful"], abs=1e-9)
    for key in ("p_at_1", "wellformed", "faithful", "precision", "recall"):
        assert memory[key] == pytest.approx(files[key], abs=1e-9, nan_ok=True), key
    assert files["skipped_images"] == {"train": 0, "val": 0, "test": 0}


def test_missing_and_corrupt_files_stop_the_run_by_name_or_are_skipped_and_counted(tiny_world_dir, exported,
                                                                                   tmp_path, capsys):
    import shutil

    files = tmp_path / "world-files"
    shutil.copytree(exported, files)
    (files / "images" / "val" / "000007.png").unlink()
    (files / "images" / "train" / "000011.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest")
    args = ["--config", "world-files", "--runtime", "local", *FAST, "--set", "rl.steps=1",
            *[x for s in file_sets(tiny_world_dir, files) for x in ("--set", s)]]
    with pytest.raises(SystemExit) as e:
        train_main([*args, "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "000007.png: image file not found" in err and "on_bad_image: skip" in err
    final = train_main([*args, "--out", str(tmp_path / "skip"), "--set", "data.on_bad_image=skip"])
    assert final["skipped_images"] == {"train": 1, "val": 1, "test": 0}
    step0 = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["skipped_images"] == final["skipped_images"]
    out = capsys.readouterr().out
    assert "train: left out 1 images" in out and "000011.png: cannot read image" in out


def test_evaluate_any_dataset_and_captions_from_any_system(tiny_world_dir, exported, tmp_path):
    """The exported world through `--dataset karpathy:...` gives the in-memory world's metrics; a COCO results
    file of the same captions scores the same; a results file missing an image is one line."""
    from raycap.evaluate import main as evaluate_main

    common = ["--world-dir", str(tiny_world_dir), "--images", "100"]
    memory = evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), "--dataset", "world:test", *common])
    files = evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), *common,
                           "--dataset", f"karpathy:{exported}/dataset_world.json:test",
                           "--retriever", str(exported / "retriever")])
    for key in ("p_at_1", "p_at_1_hard5", "bleu4", "cider", "cider_full", "clipscore", "refclipscore", "refcompare",
                "faithful", "distinct_2"):
        assert memory[key] == pytest.approx(files[key], abs=1e-6, nan_ok=True), key
    from raycap.data.cache import world_image_embeddings
    from raycap.inputs import load_captioner, load_world
    from raycap.models.clip import Retriever
    from raycap.models.tokenizers import decode

    captioner, tok = load_captioner(tiny_world_dir / "captioner")
    emb = world_image_embeddings(Retriever.load(path=str(tiny_world_dir / "retriever")), load_world(tiny_world_dir),
                                 "test", 100)
    out = captioner.eval().generate(emb, mode="greedy")
    captions = decode(tok, out.tokens, out.lengths, captioner.stop_ids)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": f"test-{i}", "caption": c} for i, c in enumerate(captions)]))
    given = evaluate_main(["--captions", str(results), "--dataset", "world:test", *common])
    assert given["decoding"] == "given"
    for key in ("p_at_1", "bleu4", "meteor", "cider", "cider_full", "clipscore", "faithful", "top_caption_share"):
        assert given[key] == pytest.approx(memory[key], abs=1e-9, nan_ok=True), key
    results.write_text(json.dumps([{"image_id": f"test-{i}", "caption": c} for i, c in enumerate(captions[:99])]))
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--captions", str(results), "--dataset", "world:test", *common])
    assert e.value.code == 2


def test_evaluate_reads_images_from_an_image_root_and_names_the_flag_for_missing_ones(tiny_world_dir, exported,
                                                                                       tmp_path, capsys):
    """`--image-root DIR`: a Karpathy JSON away from its images reads them from DIR (the same metrics as beside
    them); without it, the missing image is one line naming the command's flag, not a config key."""
    import shutil

    from raycap.evaluate import main as evaluate_main

    elsewhere = tmp_path / "annotations"
    elsewhere.mkdir()
    shutil.copy(exported / "dataset_world.json", elsewhere / "dataset_world.json")
    common = ["--captioner", str(tiny_world_dir / "captioner"), "--world-dir", str(tiny_world_dir),
              "--images", "100", "--retriever", str(exported / "retriever"), "--hard-distractors"]
    beside = evaluate_main([*common, "--dataset", f"karpathy:{exported}/dataset_world.json:val"])
    rooted = evaluate_main([*common, "--dataset", f"karpathy:{elsewhere}/dataset_world.json:val",
                            "--image-root", str(exported)])
    for key in ("p_at_1", "bleu4", "cider", "faithful"):
        assert rooted[key] == pytest.approx(beside[key], abs=1e-9, nan_ok=True), key
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate_main([*common, "--dataset", f"karpathy:{elsewhere}/dataset_world.json:val"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "image file not found" in err
    assert "pass --on-bad-image skip" in err and "data.on_bad_image" not in err
    with pytest.raises(SystemExit) as e:
        evaluate_main([*common, "--dataset", "world:val", "--image-root", str(exported)])
    assert e.value.code == 2 and "a world dataset has no image root" in capsys.readouterr().err
