"""benchmarks/faithful_policy.py reads every number of its table and plot from run dirs: seeds grouped by label
(mean and range), error cuts against the runs' own step-0 supervised evaluation."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "faithful_policy.py"


def load():
    spec = importlib.util.spec_from_file_location("faithful_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(p1, faithful):
    return {"p_at_1": p1, "wellformed": 1.0, "faithful": faithful, "faithful_1obj": 1.0, "faithful_2obj": 0.5,
            "faithful_3obj": 0.25, "precision": 0.9, "recall": 0.4}


def fake_run(root: Path, name: str, greedy_p1: float, select_p1: float | None, seconds: float) -> Path:
    run = root / name
    run.mkdir()
    lines = [{"step": 0, "eval": metrics(0.4, 0.8)}, {"step": 1, "loss": 1.0},
             {"step": 300, "eval": metrics(greedy_p1, 0.7)}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "final_metrics.json").write_text(json.dumps({"rl_seconds": seconds, "p_at_1": 0.99}))
    if select_p1 is not None:
        (run / "val_select.json").write_text(json.dumps(metrics(select_p1, 0.9)))
    return run


def test_rows_are_means_over_seeds_with_ranges_and_error_cuts(tmp_path, capsys):
    module = load()
    a0 = fake_run(tmp_path, "gate-s0", 0.7, 0.85, 200)
    a1 = fake_run(tmp_path, "gate-s1", 0.8, None, 300)
    b = fake_run(tmp_path, "other", 0.4, 0.55, 100)
    module.main([str(a0), str(a1), f"plain={b}", "--png", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "supervised captioner, greedy (step 0 of the runs): P@1 0.400, faithful 0.800"
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in out if line.startswith("| ")}
    greedy = rows[("gate", "greedy", "2")]
    # P@1 mean 0.75 (0.7-0.8); error cut (0.75-0.4)/0.6 = 58.3% (50.0%-66.7%); RL seconds 250 (200-300)
    assert "| 0.750 (0.700-0.800) | 58.3% (50.0%-66.7%) |" in greedy and greedy.endswith("| 250 (200-300) |")
    select = rows[("gate", "select", "1")]
    assert "| 0.850 | 75.0% |" in select and "| 0.900 |" in select  # only the seed with val_select.json
    assert "| 0.400 | 0.0% |" in rows[("plain", "greedy", "1")]
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_run_without_validation_is_named(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="empty: no validation evaluation"):
        load().main([str(run)])
