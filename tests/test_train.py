import json

import pytest

from raycap.config import load_config
from raycap.errors import UserError
from raycap.evaluate import main as evaluate_main
from raycap.train import main as train_main

FAST = ["--runtime", "local", "--set", "eval_images=100", "--set", "max_new_tokens=8", "--set", "eval_every=2", "--set", "threads=2"]


def test_named_config_loads_and_bad_values_name_the_field(tmp_path):
    cfg = load_config("world-demo", ["kl_coef=0.2", "steps=7"])
    assert cfg.kl_coef == 0.2 and cfg.steps == 7 and cfg.reward == "discriminative"
    for bad, needle in [(["lr=-1"], "lr"), (["reward=bleu"], "reward"), (["bogus=1"], "bogus"),
                        (["baseline=loo"], "num_samples"), (["num_candidates=500"], "num_candidates")]:
        with pytest.raises(UserError, match=needle):
            load_config("world-demo", bad)
    with pytest.raises(UserError, match="unknown config 'nope'"):
        load_config("nope")
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("extra", [
    ["--set", "baseline=greedy"],
    ["--set", "baseline=loo", "--set", "num_samples=2", "--set", "batch_size=50", "--set", "num_candidates=50"],
    ["--set", "baseline=none", "--set", "reward=cosine", "--set", "kl_estimator=sampled", "--set", "hard_distractors=5"],
    ["--set", "method=gumbel", "--set", "gumbel_loss=discriminative"],
])
def test_train_runs_each_mode_and_writes_the_run_dir(tiny_world_dir, tmp_path, extra):
    out = tmp_path / "run"
    final = train_main(["--config", "world-demo", "--out", str(out), "--set", f"world_dir={tiny_world_dir}",
                        "--set", "steps=2", *FAST, *extra])
    assert final["updates"] == 2
    for name in ("config.json", "metrics.jsonl", "final_metrics.json", "final/raycap_clipcap.json",
                 "checkpoints/step-2/trainer_state.pt"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "eval" in records[-1]


def test_train_resumes_with_the_same_step_counter(tiny_world_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    args = ["--config", "world-demo", "--out", str(out), "--set", f"world_dir={tiny_world_dir}", *FAST,
            "--set", "checkpoint_every=2"]
    train_main([*args, "--set", "steps=3"])
    shutil.rmtree(out / "checkpoints" / "step-3")  # as if killed after step 3 was logged, before its checkpoint
    train_main([*args, "--set", "steps=4"])
    assert "step-2 at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_evaluate_writes_the_issue_keys(tiny_world_dir, tmp_path):
    out = tmp_path / "eval.json"
    evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), "--world-dir", str(tiny_world_dir),
                   "--images", "100", "--json", str(out)])
    result = json.loads(out.read_text())
    for key in ("p_at_1", "bleu4", "cider", "cider_full", "clipscore", "refcompare", "vocab_size",
                "unique_caption_ratio", "wellformed", "faithful", "precision", "recall", "multi_object",
                "repetition"):
        assert key in result, key
    assert result["spice"] is None and "CoreNLP" in result["unavailable"]["spice"]


def test_train_bad_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(tmp_path / "r"), "--set", f"world_dir={tmp_path}"])
    assert e.value.code == 2 and "missing world.json" in capsys.readouterr().err
