"""Experiment trackers beside TensorBoard (`runtime.loggers`, raycap.tracking), with what runs offline: MLflow's file
store (a `file:` URI), read back with mlflow's own client, and W&B in offline mode, its run's .wandb log read back
with wandb's own reader (`wandb leet inspect --json`). Each gets the scalars of metrics.jsonl (same keys, steps and
values), the run config and the report; a resumed run logs to the same tracker runs; a missing package is one line
naming the extra to install."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from raycap.config import load_config
from raycap.errors import UserError
from raycap.train import main as train_main
from world_runs import SHORT, world_args

installed = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("wandb", "mlflow")),
                               reason="needs wandb and mlflow-skinny (pip install -e '.[test]')")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline with its own dirs in tmp (nothing reaches the network or ~), and an MLflow file store URI."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(key, "")  # recorded, so that what raycap sets (it allows the file store a config
        monkeypatch.delenv(key)      # names: MLFLOW_ALLOW_FILE_STORE) is undone after the test
    return f"file:{tmp_path / 'mlruns'}"


def numbers(record: dict) -> dict:
    """What a metrics.jsonl record should give a tracker: its numbers as train/<k>, its evaluation's as eval/<k>."""
    out = {}
    for prefix, fields in (("train", record), ("eval", record.get("eval", {}))):
        out |= {f"{prefix}/{k}": v for k, v in fields.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def same(a, b) -> bool:
    a, b = (float("nan") if x == "NaN" else float(x) for x in (a, b))  # W&B's JSON writes NaN as "NaN"
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_series(logged: dict[int, dict], records: list[dict]) -> None:
    """`logged` {step: {key: value}} holds exactly the numbers of `records`."""
    expected = {r["step"]: numbers(r) for r in records}
    assert sorted(logged) == sorted(expected)
    for step, values in expected.items():
        assert sorted(logged[step]) == sorted(values), step
        bad = {k: (logged[step][k], v) for k, v in values.items() if not same(logged[step][k], v)}
        assert not bad, (step, bad)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def wandb_records(run_dir: Path) -> list[list[dict]]:
    """The records of each offline W&B session under RUN/wandb, oldest first, read by wandb itself."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, list(run_dir.rglob("*"))
    sessions = []
    for f in files:
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
        sessions.append([json.loads(line) for line in text.splitlines() if line.strip()])

    def started(session):  # an RFC 3339 time, "2026-12-03T21:23:19.56972Z"
        start = next(r["run"]["start_time"] for r in session if r["type"] == "run")
        whole, _, fraction = start.rstrip("Z").partition(".")
        return whole, float("0." + (fraction or "0"))

    return sorted(sessions, key=started)


def wandb_history(records: list[dict]) -> dict[int, dict]:
    return {r["history"]["step"].get("num", 0): {k: v for k, v in r["history"]["item"].items()
                                                 if not k.startswith("_")}
            for r in records if r["type"] == "history"}


def mlflow_history(client, run_id: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out


def stub_report(run_dir, out=None, gallery=24, log=print, **_):
    """Stands in for raycap.report.build_report (its own tests build real ones): a page and a plot in RUN/report."""
    report = Path(run_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "index.html").write_text("<html>report</html>")
    (report / "curve_reward.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return report / "index.html"


@installed
def test_a_run_logs_its_scalars_config_and_report_to_mlflow_and_wandb(tiny_world_dir, tmp_path, offline,
                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    import raycap.report

    monkeypatch.setattr(raycap.report, "build_report", stub_report)
    monkeypatch.setattr(sys.modules["raycap.train"], "compare_final", lambda *_: None)  # the report's test table
    out = tmp_path / "run"
    train_main(["--config", "world-demo", "--out", str(out), "--runtime", "local", *world_args(tiny_world_dir),
                *SHORT, "--set", "rl.steps=2", "--set", "eval.every=1", "--set", "eval.report=true",
                "--set", "runtime.loggers=[tensorboard,mlflow,wandb]", "--set", "runtime.tracker_project=raycap-test",
                "--set", f"runtime.mlflow_tracking_uri={offline}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {"train/reward_mean", "train/kl", "eval/p_at_1", "eval/wellformed"} <= numbers(records[1]).keys()
    config = json.loads((out / "config.json").read_text())
    ids = json.loads((out / "trackers.json").read_text())
    assert any((out / "tensorboard").iterdir())

    # MLflow: one run in the experiment, every scalar at every step, the config as dotted params, the report
    client = MlflowClient(offline)
    experiment = client.get_experiment_by_name("raycap-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert_same_series(mlflow_history(client, run.info.run_id), records)
    expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat(config).items()}
    assert run.data.params == {k: v if len(v) <= 500 else v[:497] + "..." for k, v in expected.items()}
    assert run.data.params["rl.steps"] == "2"
    assert json.loads(run.data.params["runtime.loggers"]) == ["tensorboard", "mlflow", "wandb"]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "report")} == {
        "report/index.html", "report/curve_reward.png"}

    # W&B offline: the run's session logged every scalar at its step and the nested config; the report session
    # (the same run, reopened after the report is written) logged the report as an artifact
    run_session, report_session = wandb_records(out)
    header = next(r["run"] for r in run_session if r["type"] == "run")
    assert header["run_id"] == ids["wandb"]["id"] and header["project"] == "raycap-test"
    assert {k: v for k, v in header["config"]["update"].items() if k != "_wandb"} == config
    assert_same_series(wandb_history(run_session), records)
    assert next(r for r in run_session if r["type"] == "exit")["exit"].get("exit_code", 0) == 0
    assert next(r["run"] for r in report_session if r["type"] == "run")["run_id"] == ids["wandb"]["id"]
    artifact = next(r["artifact"] for r in report_session if r["type"] == "artifact")
    assert artifact["type"] == "report"
    assert {c["path"] for c in artifact["manifest"]["contents"]} == {"index.html", "curve_reward.png"}
    assert not wandb_history(report_session)


@installed
def test_a_resumed_run_logs_to_the_same_tracker_runs_and_a_fresh_start_to_new_ones(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    from raycap.runlog import RunLog

    cfg = load_config("world-demo", ["runtime.loggers=[mlflow,wandb]", f"runtime.mlflow_tracking_uri={offline}"])
    out = tmp_path / "run"
    out.mkdir()
    log = RunLog(out, 0, cfg)
    for step in range(4):  # killed after logging step 3, its last checkpoint at step 2
        log.write({"step": step, "loss": 1.0 / (step + 1), "eval": {"p_at_1": 0.1 * step}})
    log.close(failed=True)
    first = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(offline)
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FAILED"

    log = RunLog(out, 2, cfg)  # resumed: redoes step 3 (with other numbers: a changed config), then step 4
    for step in (3, 4):
        log.write({"step": step, "loss": 2.0 + step})
    log.close()
    assert json.loads((out / "trackers.json").read_text()) == first
    run_id = first["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "train/loss") if m.step == 3] == [0.25, 5.0]
    assert client.get_run(run_id).data.metrics["train/loss"] == 6.0  # the newest value
    sessions = wandb_records(out)
    assert [next(r["run"]["run_id"] for r in s if r["type"] == "run") for s in sessions] == [first["wandb"]["id"]] * 2
    assert sorted(wandb_history(sessions[1])) == [3, 4]  # offline: each session holds what it logged

    RunLog(out, 0, cfg).close()  # a fresh start in the same dir: new tracker runs
    again = json.loads((out / "trackers.json").read_text())
    assert again["mlflow"]["run_id"] != run_id and again["wandb"]["id"] != first["wandb"]["id"]


@pytest.mark.parametrize("missing, sets", [
    ("wandb", ["runtime.loggers=[tensorboard,wandb]"]),
    ("mlflow", ["runtime.loggers=[mlflow]"]),
])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, missing, sets):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(out), "--runtime", "local",
                    *[x for s in sets for x in ("--set", s)]])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: runtime.loggers: {missing!r} needs the {missing} package: "
                   f"pip install 'raycap[{missing}]'")
    assert not (out / "config.json").exists()  # refused before the run dir is written or a model loads


def test_a_search_checks_its_trackers_before_anything_starts(tmp_path, monkeypatch, capsys):
    from raycap.tune import main as tune_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "search"
    with pytest.raises(SystemExit) as e:
        tune_main(["--out", str(out), "--set", "runtime.loggers=[wandb]"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: runtime.loggers: 'wandb' needs the wandb package: "
                                               "pip install 'raycap[wandb]'")
    assert not (out / "search.json").exists()


@installed
def test_an_mlflow_store_that_cannot_open_is_one_line(monkeypatch):
    from raycap.tracking import check_loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    cfg = load_config("world-demo", ["runtime.loggers=[mlflow]", "runtime.mlflow_tracking_uri=sqlite:///x.db"])
    with pytest.raises(UserError) as e:
        check_loggers(cfg.runtime)
    assert "\n" not in str(e.value) and "pip install mlflow" in str(e.value) and "file:./mlruns" in str(e.value)
