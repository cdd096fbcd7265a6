"""Markdown rows of finished runs: the last validation evaluation and the final test evaluation of each run dir.

    python benchmarks/run_table.py runs/demo-s0 runs/demo-s1 runs/demo-s2 [--mean]
    python benchmarks/run_table.py runs/demo-s0 runs/demo-s1 runs/demo-s2 --test-table
    python benchmarks/run_table.py runs/a runs/b --val          # validation only: candidates before a choice

`--mean` adds a row with the mean and the range (min-max) of every column over the given runs (seeds); the error
cut is relative to the supervised captioner's greedy P@1 in the run's own test table. `--test-table` prints the
runs' test tables (each captioner greedy and with the run's decoding: final_metrics.json's `test_table`) as one
table, each cell the mean and range over the runs. `--val` prints each run's greedy validation evaluations (the
step-0 one is the supervised captioner) and reads nothing of the test split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TEST = ("p_at_1", "wellformed", "faithful", "precision", "recall", "multi_object")
TABLE = ("p_at_1", "wellformed", "faithful", "precision")
REFERENCE = ("bleu4", "cider", "clipscore", "refcompare")  # in runs with eval.test_table_references


def row(run: Path) -> dict:
    final = json.loads((run / "final_metrics.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = [r["eval"] for r in records if "eval" in r][-1]
    out = {"val_p_at_1": val["p_at_1"], "val_wellformed": val["wellformed"], "val_faithful": val["faithful"]}
    out |= {k: final[k] for k in TEST}
    if "test_table" in final:
        base = next(r["p_at_1"] for r in final["test_table"]["rows"] if (r["captioner"], r["decoding"]) ==
                    ("supervised", "greedy"))
        out["error_cut"] = (final["p_at_1"] - base) / (1 - base)
    out["rl_seconds"] = final.get("rl_seconds", float("nan"))
    return out


def spread(values: list[float], percent: bool = False) -> str:
    f = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3f}")
    mean = sum(values) / len(values)
    return f(mean) if len(values) == 1 else f"{f(mean)} ({f(min(values))}-{f(max(values))})"


def val_table(runs: list[Path]) -> None:
    """Each run's last validation evaluation beside its step-0 one (the supervised captioner), and the best P@1."""
    print("| run | updates | val P@1 | P@1 error cut | wellformed | faithful | supervised P@1 / faithful |")
    print("| --- " * 7 + "|")
    for run in runs:
        evals = [(r["step"], r["eval"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "eval" in r]
        (_, start), (step, last) = evals[0], evals[-1]
        cut = (last["p_at_1"] - start["p_at_1"]) / (1 - start["p_at_1"])
        print(f"| {run} | {step} | {last['p_at_1']:.3f} | {100 * cut:.1f}% | {last['wellformed']:.3f} | "
              f"{last['faithful']:.3f} | {start['p_at_1']:.3f} / {start['faithful']:.3f} |")


def test_table(runs: list[Path]) -> None:
    """The runs' test tables as one: a row per captioner and decoding, mean (range) over the runs."""
    tables = [json.loads((r / "final_metrics.json").read_text())["test_table"] for r in runs]
    keys = [(r["captioner"], r["decoding"]) for r in tables[0]["rows"]]
    columns = [*TABLE, *(k for k in REFERENCE if all(k in r for t in tables for r in t["rows"]))]
    print(f"| test, first {tables[0]['n_images']} images | " + " | ".join(columns) + " | P@1 error cut |")
    print("| --- " * (len(columns) + 2) + "|")
    for i, (captioner, decoding) in enumerate(keys):
        cells = [spread([t["rows"][i][k] for t in tables]) for k in columns]
        cut = "-" if captioner == "supervised" else spread(
            [t["error_cut_vs_supervised_greedy"][decoding] for t in tables], percent=True)
        print(f"| {captioner}, {decoding} | " + " | ".join(cells) + f" | {cut} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--mean", action="store_true", help="add the mean and range over the runs")
    p.add_argument("--test-table", action="store_true", help="the runs' four-row test tables, mean and range")
    p.add_argument("--val", action="store_true", help="validation only: each run's last greedy evaluation")
    args = p.parse_args()
    if args.val:
        val_table(args.runs)
        return
    if args.test_table:
        test_table(args.runs)
        return
    rows = {str(r): row(r) for r in args.runs}
    cols = [c for c in next(iter(rows.values())) if all(c in r for r in rows.values())]
    print("| run | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c != "rl_seconds" else f"{r[c]:.0f}" for c in cols) + " |")
    if args.mean:
        cells = []
        for c in cols:
            v = [r[c] for r in rows.values()]
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}-{max(v):.3f})")
        print(f"| mean (range) over {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
