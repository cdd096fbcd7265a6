"""More bad input tried as a new user would (tests/test_bad_input.py's rule): one line naming the file, field or
value, exit 2 from a CLI, before any heavy work, and nothing lost."""
import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
import torch

from raycap.config import WORLD_DIR, load_config
from raycap.errors import UserError

from cli_checks import exits_2
from world_runs import world_args


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. export-world into a directory of the user's ----------------------------------------------------------------


def test_export_world_refuses_a_non_empty_dir_that_is_not_an_export(tmp_path, capsys):
    from raycap.data.__main__ import main

    out = tmp_path / "mine"
    (out / "retriever").mkdir(parents=True)
    (out / "README.txt").write_text("my notes")
    (out / "dataset_world.json").write_text(json.dumps({"images": [{"id": 1}], "note": "my dataset"}))
    (out / "retriever" / "my_weights.pth").write_bytes(b"\x00my weights")
    before = tree(out)
    msg = exits_2(main, ["export-world", "--out", str(out)], capsys)
    assert msg.startswith(f"error: --out {out}: not empty (README.txt, dataset_world.json, retriever)")
    assert "not a previous export-world output" in msg
    assert tree(out) == before  # nothing overwritten, deleted or added


def test_previous_exports_are_recognised_old_and_new(tmp_path):
    from raycap.data.export import MARKER_FILE, SHIPPED_WORLD, check_export_dir, load_world_config

    config = load_world_config(SHIPPED_WORLD)
    world = json.loads(json.dumps(config.model_dump()))
    legacy = tmp_path / "legacy"  # an export from before the marker file: its Karpathy JSON tells
    legacy.mkdir()
    (legacy / "dataset_world.json").write_text(json.dumps({"dataset": "world", "world": world, "images": []}))
    (legacy / "README.txt").write_text("written by export-world")
    check_export_dir(legacy, config)
    marked = tmp_path / "marked"  # an interrupted export: the marker and some images, no JSON yet
    (marked / "images" / "train").mkdir(parents=True)
    (marked / MARKER_FILE).write_text(json.dumps({"world": world}))
    check_export_dir(marked, config)
    check_export_dir(tmp_path / "new", config)
    (tmp_path / "empty").mkdir()
    check_export_dir(tmp_path / "empty", config)
    (marked / MARKER_FILE).write_text(json.dumps({"world": world | {"n_train": 7}}))
    with pytest.raises(UserError, match="holds an export of a different world"):
        check_export_dir(marked, config)


# -- 2. an endless caption, and a METEOR process that never answers ----------------------------------------------


def test_evaluate_refuses_an_overlong_caption_before_any_model_loads(tmp_path, capsys, no_heavy_work):
    from raycap.evaluate import MAX_CAPTION_CHARS, main

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": "test-0", "caption": "a red circle"},
                                   {"image_id": "test-1", "caption": "x" * 100_000}]))
    msg = exits_2(main, ["--captions", str(results), "--text-only"], capsys)
    assert msg == (f"error: --captions {results}: the caption of image_id 'test-1' has 100,000 characters, over "
                   f"the limit of {MAX_CAPTION_CHARS:,} (entry 1)")


@pytest.mark.timeout(60)
def test_a_silent_meteor_process_is_stopped_and_named(monkeypatch, capsys):
    from raycap.metrics import captions

    monkeypatch.setattr(captions._MeteorProcess, "COMMAND", ("sleep", "300"))  # reads nothing, answers nothing
    t = time.time()
    with pytest.raises(captions.MeteorError) as e:
        captions.meteor_score({0: ["a red circle"], 1: ["a blue square"]}, {0: ["a red circle"], 1: ["a square"]},
                              names=["the caption of image_id 'test-0'", "the caption of image_id 'test-1'"],
                              timeout=1)
    assert time.time() - t < 20
    assert str(e.value) == ("meteor: no answer from the METEOR process within 1 s while scoring the caption of "
                            "image_id 'test-0'; it was stopped")


@pytest.mark.timeout(120)
def test_meteor_that_fails_is_unavailable_and_the_other_metrics_kept(monkeypatch, capsys):
    from raycap.metrics import captions

    if not shutil.which("java"):
        pytest.skip("no java")
    monkeypatch.setattr(captions._MeteorProcess, "COMMAND", ("java", "-jar", "no-such-meteor.jar"))
    out = captions.ngram_metrics(["a red circle", "a green square"], [["a red circle"], ["a blue square"]],
                                 ids=["test-0", "test-1"])
    assert out["bleu1"] > 0 and "cider" in out and "meteor" not in out
    reason = out["unavailable"]["meteor"]
    assert reason.startswith("meteor: the METEOR process ended (exit code 1) while scoring the caption of "
                             "image_id 'test-0'") and "\n" not in reason
    assert f"warning: {reason}" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_bounded_meteor_gives_pycocoevalcaps_scores():
    """Two tiny captions through the real METEOR jar: pycocoevalcap's Meteor().compute_score gave these."""
    from raycap.metrics.captions import meteor_score

    if not shutil.which("java"):
        pytest.skip("no java")
    score, per_caption = meteor_score({0: ["a red circle", "a small red circle"], 1: ["a blue square at top left"]},
                                      {0: ["a red circle"], 1: ["a green square"]})
    assert score == pytest.approx(0.27594730983196186, abs=1e-9)
    assert per_caption == pytest.approx([1.0, 0.12355212355212356], abs=1e-9)


# -- 3. sizes checked against the data ------------------------------------------------------------------------------


def test_batch_larger_than_the_training_split_is_refused_before_the_run(tmp_path, capsys, no_heavy_work):
    from raycap.data.export import SHIPPED_WORLD, load_world_config
    from raycap.train import main

    n_train = load_world_config(SHIPPED_WORLD).n_train
    out = tmp_path / "run"
    msg = exits_2(main, ["--out", str(out), "--set", "rl.batch_size=1000000000"], capsys)
    assert msg.startswith(f"error: rl.batch_size 1000000000: more than the {n_train} training images of "
                          "data.splits.train (train)")
    assert not out.exists()
    msg = exits_2(main, ["--out", str(out), "--set", "data.train_images=20"], capsys)  # batch 32 of world-demo
    assert msg.startswith("error: rl.batch_size 32: more than the 20 training images of data.splits.train (train, "
                          "first data.train_images=20)")


def test_data_sizes_of_any_dataset():
    from raycap.inputs import check_data_sizes

    cfg = load_config("world-demo", ["rl.batch_size=64", "rl.reward.num_candidates=64"])
    check_data_sizes(cfg, {"train": 64, "val": 100, "test": 100})
    with pytest.raises(UserError, match=re.escape("rl.batch_size 64: more than the 50 training images")):
        check_data_sizes(cfg, {"train": 50, "val": 100, "test": 100})
    cfg = load_config("world-demo", ["rl.reward.num_candidates=40", "rl.reward.hard_distractors=10"])
    with pytest.raises(UserError, match=re.escape("rl.reward.num_candidates 40: more than the 35 training images")):
        check_data_sizes(cfg, {"train": 35, "val": 100, "test": 100})
    with pytest.raises(UserError, match=re.escape("data.splits.test (test): 99 images; an evaluation ranks each "
                                                  "among 100 (P@1), so at least 100 are needed")):
        check_data_sizes(cfg, {"train": 500, "val": 100, "test": 99})


# -- 4. pickled checkpoints -------------------------------------------------------------------------------------------


class Planted:
    """Unpickling this would create a file: proof that a refused checkpoint ran nothing."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def planted_checkpoint(path: Path, proof: Path) -> Path:
    torch.save({"gpt.wte.weight": torch.zeros(2, 2), "extra": Planted(proof)}, path)
    return path


def plain_line(msg: str, path) -> None:
    assert f"{path}: not a plain tensor checkpoint (it holds pickled objects), and raycap will not unpickle it" in msg
    assert "torch.save(model.state_dict(), path)" in msg
    assert "re-running" not in msg and "\n" not in msg


def test_convert_refuses_a_pickled_clipcap_checkpoint(tmp_path, capsys):
    from raycap.convert import main

    proof = tmp_path / "ran"
    pt = planted_checkpoint(tmp_path / "coco_weights.pt", proof)
    tokenizer = WORLD_DIR / "captioner" / "tokenizer"
    msg = exits_2(main, ["clipcap", str(pt), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer)], capsys)
    plain_line(msg, pt)
    assert not proof.exists() and not (tmp_path / "out").exists()


def test_a_pickled_trainer_state_is_refused(tmp_path):
    from raycap.models.torch_io import load_tensors

    proof = tmp_path / "ran"
    state = planted_checkpoint(tmp_path / "trainer_state.pt", proof)
    with pytest.raises(UserError) as e:
        load_tensors(state)
    plain_line(str(e.value), state)
    assert not proof.exists()
    (tmp_path / "torn.pt").write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'torn.pt'}: cannot read it as a torch checkpoint")):
        load_tensors(tmp_path / "torn.pt")
    torch.save({"step": torch.tensor(3)}, tmp_path / "ok.pt")
    assert load_tensors(tmp_path / "ok.pt")["step"] == 3


def test_an_open_clip_dir_with_pickled_weights_is_refused(tmp_path):
    from raycap.config import RetrieverConfig
    from raycap.data.export import SHIPPED_WORLD, export_retriever
    from raycap.inputs import load_retriever
    from raycap.models.clip import Retriever

    d = export_retriever(Retriever.from_pretrained(SHIPPED_WORLD / "retriever"), tmp_path / "clip", verify=False)
    (d / "open_clip_model.safetensors").unlink()  # its weights: a pickled .bin instead
    proof = tmp_path / "ran"
    planted_checkpoint(d / "open_clip_pytorch_model.bin", proof)
    with pytest.raises(UserError) as e:
        load_retriever(RetrieverConfig(path=str(d)))
    plain_line(str(e.value), d / "open_clip_pytorch_model.bin")
    assert not proof.exists()


# -- 5. an empty config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_is_refused(tmp_path, capsys, no_heavy_work, text):
    from raycap.train import main

    cfg = tmp_path / "empty.yaml"
    cfg.write_text(text)
    msg = exits_2(main, ["--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert msg.startswith(f"error: {cfg}: the config is empty (no settings)") and "world-demo" in msg
    assert not (tmp_path / "run").exists()


# -- 6. refused runs write nothing; the corrected retry of the same --out starts ------------------------------------


class Started(Exception):
    """Raised where the training loop would start."""


def test_a_refused_run_leaves_its_out_for_the_corrected_retry(tiny_world_dir, tmp_path, capsys, monkeypatch):
    import raycap.local_trainer
    from raycap.train import main

    bad = tmp_path / "cap"
    shutil.copytree(tiny_world_dir / "captioner", bad)
    weights = bad / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    args = ["--runtime", "local", "--out", str(out), *world_args(tiny_world_dir), "--set", "eval.images=100",
            "--set", "rl.batch_size=24", "--set", "rl.reward.num_candidates=24", "--set", "threads=1"]
    msg = exits_2(main, [*args, "--set", f"captioner.path={bad}"], capsys)
    assert f"{weights}: cannot read weights" in msg
    assert not (out / "config.json").exists() and not (out / "run.json").exists()

    def started(*a, **k):
        raise Started
    monkeypatch.setattr(raycap.local_trainer, "run_updates", started)
    with pytest.raises(Started):  # the retry with the captioner fixed passes every check (no "different config")
        main(args)
    assert json.loads((out / "config.json").read_text())["captioner"]["path"] == str(tiny_world_dir / "captioner")
    assert json.loads((out / "run.json").read_text()) == {"runtime": "local"}


# -- 7. duplicate YAML keys, extra image ids, the --set to blame ------------------------------------------------------


def test_a_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    cfg = tmp_path / "two-rl.yaml"
    cfg.write_text("rl:\n  steps: 10\neval:\n  every: 5\nrl:\n  batch_size: 16\n")
    with pytest.raises(UserError) as e:
        load_config(str(cfg))
    assert str(e.value) == (f"{cfg}: invalid YAML: line 5, column 1: duplicate key 'rl' (first at line 1); a later "
                            "one would silently replace the earlier, so give each key once")
    cfg.write_text("rl:\n  steps: 10\n  sampling: {num_samples: 2, num_samples: 4}\n")
    with pytest.raises(UserError, match=re.escape("line 3, column 30: duplicate key 'num_samples'")):
        load_config(str(cfg))
    with pytest.raises(UserError, match=re.escape("--set 'rl.sampling={num_samples: 2, num_samples: 4}': value is "
                                                  "not valid YAML (line 1, column 18: duplicate key")):
        load_config("world-demo", ["rl.sampling={num_samples: 2, num_samples: 4}"])
    cfg.write_text("base: &b {steps: 10}\nrl:\n  <<: *b\n  steps: 12\n")  # a merge key may be overridden
    from raycap.config import read_yaml_mapping
    assert read_yaml_mapping(cfg)["rl"] == {"steps": 12}
    # an anchor that merges and overrides, merged again further down: PyYAML flattens the anchored mapping in
    # place before constructing it, and the merged-in key is no duplicate of the override
    cfg.write_text("base: &b {k: 1}\na: {inner: &i {<<: *b, k: 2}}\nc: {<<: *i}\n")
    assert read_yaml_mapping(cfg) == yaml.safe_load(cfg.read_text())


def test_extra_image_ids_in_a_results_file_are_counted_in_a_warning(tmp_path, capsys):
    from raycap.evaluate import given_captions

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": f"test-{i}", "caption": "a shape"} for i in range(5)]
                                  + [{"image_id": "val-9", "caption": "a shape"}, {"image_id": 42, "caption": "x"}]))
    args = SimpleNamespace(captions=results, dataset="world:test")
    source = SimpleNamespace(ids=["test-0", "test-1", "test-2"])  # --images 3 of a 5-image split
    assert given_captions(args, source, known={f"test-{i}" for i in range(5)}) == ["a shape"] * 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: --captions {results}: 2 of its 7 image_ids are not in world:test (e.g. 'val-9') "
                   "and are ignored"]
    given_captions(args, source, known={f"test-{i}" for i in range(5)} | {"val-9", "42"})
    assert capsys.readouterr().err == ""


def test_a_consistency_error_blames_only_the_sets_involved():
    with pytest.raises(UserError) as e:  # world-demo's 32 candidates no longer fit a batch of 8
        load_config("world-demo", ["rl.steps=5", "rl.batch_size=8", "rl.optimiser.lr=0.001"])
    assert str(e.value).startswith("--set rl.batch_size=8: rl: ") and "num_candidates (32)" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config("world-demo", ["eval.every=7", "runtime.learner_workers=5", "rl.steps=5"])
    assert str(e.value).startswith("--set runtime.learner_workers=5: <root>: ")
    with pytest.raises(UserError) as e:  # both together break it: both named
        load_config("world-demo", ["rl.steps=5", "rl.batch_size=30", "rl.reward.num_candidates=40"])
    assert str(e.value).startswith("--set rl.batch_size=30 rl.reward.num_candidates=40: rl: ")


def test_a_fault_in_the_config_file_is_not_blamed_on_an_unrelated_set(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rl:\n  sampling: {num_samples: 1}\n  algorithm: {baseline: loo}\n")
    with pytest.raises(UserError) as e:
        load_config(str(cfg), ["rl.steps=5"])
    assert not str(e.value).startswith("--set") and "rl.steps" not in str(e.value), str(e.value)
