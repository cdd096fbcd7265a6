"""python -m raycap.tune: search spaces checked line by line, the quality-respecting objective and Pareto front
on hand-made numbers, a tiny search end to end on both trial runtimes, resume after Ctrl-C, and cluster.yaml
against Ray's own schema."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raycap.errors import UserError
from raycap.search.results import Objective, mark_pareto, pareto_front
from raycap.search.space import load_space, named_spaces
from raycap.tune import main as tune_main
from world_runs import world_sets

ROOT = Path(__file__).resolve().parent.parent


def tiny_space(tmp_path, world, **search) -> Path:
    """A search on the tiny world: 4 updates of 24 images, evaluations of 100 images every 2 updates."""
    fixed = dict(s.split("=", 1) for s in world_sets(world))
    fixed |= {"rl.steps": 4, "eval.every": 2, "eval.images": 100, "rl.batch_size": 24, "rl.reward.num_candidates": 24,
              "rl.sampling.max_new_tokens": 8, "eval.select_samples": 4}
    settings = {"num_samples": 2, "max_concurrent": 2, "grace_period": 2, "reduction_factor": 2} | search
    space = {"config": "world-demo", "set": fixed,
             "params": {"rl.optimiser.lr": {"loguniform": [0.5, 2.0], "relative": True},
                        "rl.algorithm.kl_coef": {"choice": [0.1, 1.0]}},
             "search": settings}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# -- spaces -----------------------------------------------------------------------------------------------
def test_named_spaces_load_and_draw_valid_configs():
    assert {"demo", "discritune", "gumbel"} <= set(named_spaces())
    assert (ROOT / "tune_spaces" / "demo.yaml").is_file()  # the top-level view of the packaged spaces
    for name in ("demo", "discritune", "gumbel"):
        space = load_space(name)
        base = space.base_config().model_dump(mode="json")
        for p in space.params:  # every choice and each end of every range makes a valid run config
            for v in p.values_to_check():
                space.trial_config({p.name: v}, base)
    demo = load_space("demo")
    lr = demo.param("rl.optimiser.lr")
    assert lr.relative and lr.args == pytest.approx([1.5e-4, 6e-4])  # 0.5x .. 2x world-demo's 3e-4
    disc = load_space("discritune", config="coco-clipcap")
    assert disc.param("rl.optimiser.lr").args == pytest.approx([3e-8, 3e-7])  # relative to the paper's 1e-7
    loo = disc.trial_config({"rl.algorithm.baseline": {"rl.algorithm.baseline": "loo", "rl.sampling.num_samples": 4}},
                            disc.base_config().model_dump(mode="json"))
    assert loo.rl.algorithm.baseline == "loo" and loo.rl.sampling.num_samples == 4


BAD_SPACES = [
    ({"config": "world-demo", "params": {"rl.optimiser.lr": {"loguniform": [1e-4, 1e-3]}}, "serach": {}},
     "unknown key 'serach'"),
    ({"config": "world-demo", "params": {"rl.algorithm.kl_cof": {"loguniform": [0.1, 1.0]}}},
     "params.rl.algorithm.kl_cof: unknown key 'kl_cof' in section 'rl.algorithm'"),
    ({"config": "world-demo", "params": {"rl.kl_coef": {"loguniform": [0.1, 1.0]}}},
     "params.rl.kl_coef: unknown key 'kl_coef' in section 'rl' (now rl.algorithm.kl_coef)"),
    ({"config": "world-demo", "params": {"rl.algorithm.kl_coef": {"loguniform": [1.0, 0.1]}}},
     "params.rl.algorithm.kl_coef.loguniform: low must be below high"),
    ({"config": "world-demo", "params": {"rl.algorithm.kl_coef": {"loguniform": [0.0, 1.0]}}},
     "params.rl.algorithm.kl_coef.loguniform: loguniform needs low > 0"),
    ({"config": "world-demo", "params": {"rl.reward.kind": {"choice": ["discriminative", "bleu"]}}},
     "params.rl.reward.kind: rl.reward.kind='bleu' is not allowed"),
    ({"config": "world-demo", "params": {"rl.algorithm.kl_coef": {"uniform": [-1.0, 1.0]}}},
     "params.rl.algorithm.kl_coef: rl.algorithm.kl_coef=-1.0 is not allowed"),
    ({"config": "world-demo", "set": {"rl.sampling.num_samples": 1, "rl.algorithm.baseline": "mean"},
      "params": {"rl.algorithm.baseline": {"choice": ["mean", "loo"]}}},
     "params.rl.algorithm.baseline: rl.algorithm.baseline='loo' is not allowed: rl: Value error, "
     "algorithm.baseline 'loo' needs sampling.num_samples >= 2"),
    ({"config": "world-demo", "params": {"data.train_images": {"choice": [100, 200]}}},
     "params.data.train_images: data.train_images cannot vary between trials"),
    ({"config": "world-demo", "params": {"rl.optimiser.lr": {"loguniform": [1e-4, 1e-3], "scale": 2}}},
     "params.rl.optimiser.lr: unknown key 'scale'"),
    ({"config": "world-demo", "params": {"rl.optimiser.lr": {"loguniform": [1e-4, 1e-3]}},
      "search": {"num_samples": 0}},
     "search: num_samples: Input should be greater than or equal to 1"),
    ({"config": "world-demo", "params": {"rl.optimiser.lr": {"loguniform": [1e-4, 1e-3]}},
      "search": {"trial_runtime": "slurm"}}, "search: trial_runtime"),
    ({"config": "nope", "params": {"rl.optimiser.lr": {"loguniform": [1e-4, 1e-3]}}}, "unknown config 'nope'"),
    ({"config": "world-demo", "params": {}}, "params: a mapping of parameters to search, at least one"),
]


@pytest.mark.parametrize("space,needle", BAD_SPACES)
def test_a_bad_space_is_one_line_naming_the_file_and_key(tmp_path, space, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(UserError) as e:
        load_space(str(path))
    msg = str(e.value)
    assert msg.startswith(str(path)) and needle in msg and "\n" not in msg


def test_bad_space_exits_2_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("config: world-demo\nparams:\n  rl.algorithm.kl_coef: {loguniform: [1.0, 0.1]}\n")
    with pytest.raises(SystemExit) as e:
        tune_main(["--space", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "bad.yaml: params.rl.algorithm.kl_coef.loguniform: low must be below high" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_main(["--space", "nope", "--out", str(tmp_path / "out")])
    assert "unknown search space 'nope'" in capsys.readouterr().err


# -- the objective and the front -------------------------------------------------------------------------
def test_objective_ranks_every_wellformed_trial_above_the_rest():
    obj = Objective()  # P@1 among trials with wellformed >= 0.95
    salad = {"p_at_1": 0.733, "wellformed": 0.009, "faithful": 0.0}  # kl_coef=0, measured in RESULTS
    modest = {"p_at_1": 0.60, "wellformed": 0.99, "faithful": 0.5}
    assert obj.value(salad) == pytest.approx(-0.267) and obj.value(modest) == pytest.approx(0.60)
    assert obj.value(modest) > obj.value(salad) and not obj.feasible(salad)
    strict = Objective(min_faithful=0.55)
    assert not strict.feasible(modest) and strict.value(modest) == pytest.approx(-0.40)
    real = {"p_at_1": 0.4}  # no world checks on real data: nothing to constrain, and it says so
    assert obj.feasible(real) and obj.unmeasured(real) == ["wellformed"]


def test_pareto_front_by_hand():
    pts = [(0.38, 0.82), (0.53, 0.63), (0.44, 0.78), (0.40, 0.70), (0.53, 0.60), (0.10, 0.82)]
    # (0.40, 0.70) is beaten by (0.44, 0.78); (0.53, 0.60) by (0.53, 0.63); (0.10, 0.82) by (0.38, 0.82)
    assert pareto_front(pts) == [0, 1, 2]
    rows = [{"faithful": x, "p_at_1": y} for x, y in pts] + [{"faithful": None, "p_at_1": 0.9}]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, True, False, False, False, False]


# -- searches --------------------------------------------------------------------------------------------
def check_search_outputs(out: Path, summary: dict, trials: int) -> None:
    """What a finished search leaves: the table, the plot, the chosen config (rerunnable), its captioner, its
    single test evaluation and its report, all consistent with the trials' validation results."""
    from raycap.config import load_config
    from raycap.inputs import load_captioner

    rows = summary["trials"]
    assert len(rows) == trials and all(r["status"] in ("completed", "stopped early") for r in rows)
    assert {r["rl.algorithm.kl_coef"] for r in rows} <= {0.1, 1.0}
    for name in ("results.csv", "results.md", "pareto.png", "summary.json", "best/config.yaml",
                 "best/test_metrics.json", "best/test_metrics.md", "best/run/report/index.html"):
        assert (out / name).is_file(), name
    best = summary["best"]
    chosen = max(rows, key=lambda r: r["objective"])
    assert best["trial"] == chosen["trial"] and chosen["best"]
    cfg = load_config(str(out / "best" / "config.yaml"))  # the chosen config reruns as it is
    assert cfg.rl.algorithm.kl_coef == chosen["rl.algorithm.kl_coef"] and cfg.rl.optimiser.lr == pytest.approx(chosen["rl.optimiser.lr"])
    assert cfg.rl.steps == 4 and cfg.eval.report  # the space's fixed settings, not the trial's internals
    load_captioner(out / "best" / "captioner")
    test = json.loads((out / "best" / "test_metrics.json").read_text())
    assert set(test) == {"supervised", "best"} and test["best"]["n_images"] == 100  # the test split, once
    md = (out / "results.md").read_text()
    assert md.startswith("| trial | rl.optimiser.lr | rl.algorithm.kl_coef |") and chosen["trial"] in md
    # the trials chose on validation: the chosen run's last logged evaluation is the one the table shows
    log = [json.loads(line) for line in (out / "best" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == chosen["step"]
    assert log[-1]["eval"]["p_at_1"] == pytest.approx(chosen["p_at_1"])


def test_search_with_trials_on_the_ray_runtime(tiny_world_dir, tmp_path):
    """A trial on the Ray runtime: its controller and actors in one placement group Tune reserves for it."""
    out = tmp_path / "search"
    summary = tune_main(["--space", str(tiny_space(tmp_path, tiny_world_dir, num_samples=1, trial_runtime="ray")),
                         "--out", str(out), "--min-wellformed", "-1", "--set", "runtime.cpus_per_learner=0.5",
                         "--set", "runtime.cpus_per_rollout=0.25", "--set", "runtime.cpus_per_reward=0.25",
                         "--set", "eval.report=false", "--set", "eval.test_table=false"])
    (row,) = summary["trials"]
    assert row["status"] == "completed" and row["step"] == 4
    run = out / "best" / "run"
    assert json.loads((run / "run.json").read_text())["runtime"] == "ray"
    assert (run / "checkpoints" / "step-4" / "controller.pt").is_file() and (out / "best" / "captioner").is_dir()


def test_an_interrupted_search_resumes_its_remaining_trials_and_writes_its_results(tiny_world_dir, tmp_path):
    """Ctrl-C after the first of 3 trials, then --resume: the rest run, the finished one is not rerun, and the
    search writes everything a search writes."""
    space = tiny_space(tmp_path, tiny_world_dir, num_samples=3, max_concurrent=2)
    out = tmp_path / "search"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "raycap.tune", "--space", str(space), "--out", str(out),
                             "--min-wellformed", "-1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # until the first trial has finished
            done = [p for p in (out / "search").glob("*/result.json")
                    if any(json.loads(line).get("step") == 4 for line in p.read_text().splitlines() if line)]
            if done:
                break
            time.sleep(0.5)
        assert done and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    first = done[0].parent.name
    assert "--resume continues it" in (tmp_path / "first.log").read_text()
    summary = tune_main(["--out", str(out), "--resume"])
    rows = summary["trials"]
    assert len(rows) == 3 and all(r["step"] == 4 for r in rows)
    finished_first = next(p for p in (out / "search").iterdir() if p.name == first)
    steps = [json.loads(line)["step"] for line in (finished_first / "result.json").read_text().splitlines() if line]
    assert steps == [0, 2, 4]  # the trial that had finished was not run again
    check_search_outputs(out, summary, trials=3)


def test_resume_needs_a_search(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tune_main(["--out", str(tmp_path / "none"), "--resume"])
    assert e.value.code == 2 and "search.json not found" in capsys.readouterr().err


# -- the cluster front door ------------------------------------------------------------------------------
def test_cluster_yaml_is_valid_for_ray_up_and_opens_no_ray_port():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(json.loads(json.dumps(config))))  # what `ray up` checks
    broken = json.loads(json.dumps(config)) | {"head_node_typ": "head"}
    with pytest.raises(Exception):  # the validator is real: a misspelt key fails it
        validate_config(prepare_config(broken))
    rules = config["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or \
            any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert not (public and {8265, 6379, 10001} & set(ports)), rule
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert any("pip install" in c and "raycap" in c for c in config["setup_commands"])
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] < workers["max_workers"]


def test_a_ray_job_joins_its_cluster(monkeypatch):
    """Under `ray job submit` RAY_ADDRESS names the cluster: raycap joins it instead of starting a local Ray."""
    import ray

    from raycap.config import RuntimeConfig
    from raycap.runtime import resources

    calls = []

    class Ctx:
        dashboard_url = "127.0.0.1:8265"
        address_info = {"node_ip_address": "127.0.0.1"}

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or Ctx())
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    resources.start_ray(RuntimeConfig())
    assert calls[0]["address"] == "10.0.0.5:6379" and "num_cpus" not in calls[0]
