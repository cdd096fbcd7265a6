import json

import pytest

from raycap.config import load_config
from raycap.errors import UserError
from raycap.evaluate import main as evaluate_main
from raycap.train import main as train_main
from world_runs import world_args

FAST = ["--runtime", "local", "--set", "eval.images=100", "--set", "rl.sampling.max_new_tokens=8", "--set",
        "eval.every=2", "--set", "threads=2",
        "--set", "eval.report=false", "--set", "eval.test_table=false", "--set", "eval.select_samples=4"]


def test_named_config_loads_and_bad_values_name_the_field(tmp_path):
    cfg = load_config("world-demo", ["rl.algorithm.kl_coef=0.2", "rl.steps=7"])
    assert cfg.rl.algorithm.kl_coef == 0.2 and cfg.rl.steps == 7 and cfg.rl.reward.kind == "pool"
    for bad, needle in [(["rl.optimiser.lr=-1"], "lr"), (["rl.reward.kind=bleu"], "reward"), (["bogus=1"], "bogus"),
                        (["rl.sampling.num_samples=1"], "num_samples"),
                        (["rl.reward.num_candidates=500"], "num_candidates")]:
        with pytest.raises(UserError, match=needle):
            load_config("world-demo", bad)
    with pytest.raises(UserError, match="unknown config 'nope'"):
        load_config("nope")
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("extra", [
    ["--set", "rl.algorithm.baseline=greedy"],
    ["--set", "rl.algorithm.baseline=loo", "--set", "rl.sampling.num_samples=2", "--set", "rl.batch_size=50", "--set",
     "rl.reward.num_candidates=50"],
    ["--set", "rl.algorithm.baseline=none", "--set", "rl.reward.kind=cosine", "--set",
     "rl.algorithm.kl_estimator=sampled", "--set", "rl.reward.hard_distractors=5"],
    ["--set", "rl.method=gumbel", "--set", "rl.self_check.gate=false", "--set", "rl.algorithm.gumbel_loss=discriminative"],
])
def test_train_runs_each_mode_and_writes_the_run_dir(tiny_world_dir, tmp_path, extra):
    out = tmp_path / "run"
    final = train_main(["--config", "world-demo", "--out", str(out), *world_args(tiny_world_dir),
                        "--set", "rl.steps=2", *FAST, *extra])
    assert final["updates"] == 2
    for name in ("config.json", "metrics.jsonl", "final_metrics.json", "final/raycap_clipcap.json",
                 "checkpoints/step-2/trainer_state.pt"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "eval" in records[-1]


def test_train_resumes_with_the_same_step_counter(tiny_world_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    args = ["--config", "world-demo", "--out", str(out), *world_args(tiny_world_dir), *FAST,
            "--set", "checkpoint_every=2"]
    train_main([*args, "--set", "rl.steps=3"])
    shutil.rmtree(out / "checkpoints" / "step-3")  # as if killed after step 3 was logged, before its checkpoint
    train_main([*args, "--set", "rl.steps=4"])
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


def test_evaluate_selects_among_samples_against_another_pool(tiny_world_dir, tmp_path, capsys):
    """--decoding select: the best of eval.select_samples captions against --pool's images; the evaluated images
    themselves are refused as the pool in one line."""
    out = tmp_path / "select.json"
    few = tmp_path / "few.yaml"  # world-demo's selection with 4 samples per image (its 64 cost CI a minute)
    few.write_text("eval: {select_samples: 4}\n")
    evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), "--world-dir", str(tiny_world_dir),
                   "--images", "100", "--decoding", "select", "--select-config", str(few), "--pool", "world:train",
                   "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["decoding"] == "select4" and 0 <= result["faithful"] <= 1
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), "--world-dir", str(tiny_world_dir),
                       "--dataset", "world:val", "--decoding", "select", "--pool", "world:val"])
    assert e.value.code == 2 and "--pool world:val: the evaluated images themselves" in capsys.readouterr().err


def test_train_bad_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(tmp_path / "r"), *world_args(tmp_path)])
    assert e.value.code == 2 and f"captioner.path {tmp_path}/captioner: no such directory" in capsys.readouterr().err
