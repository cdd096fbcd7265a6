"""Markdown rows of finished runs: the last validation evaluation and the final test evaluation of each run dir.

    python benchmarks/run_table.py runs/demo-s0 runs/demo-s1 runs/demo-s2 [--mean]

`--mean` adds a row with the mean and the range (min-max) of every column over the given runs (seeds).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = 0.416  # test P@1 of the shipped supervised captioner
TEST = ("p_at_1", "wellformed", "faithful", "precision", "recall", "multi_object")


def row(run: Path) -> dict:
    final = json.loads((run / "final_metrics.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = [r["eval"] for r in records if "eval" in r][-1]
    out = {"val_p_at_1": val["p_at_1"], "val_wellformed": val["wellformed"], "val_faithful": val["faithful"]}
    out |= {k: final[k] for k in TEST}
    out["error_cut"] = (final["p_at_1"] - BASE) / (1 - BASE)
    out["rl_seconds"] = final.get("rl_seconds", float("nan"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--mean", action="store_true", help="add the mean and range over the runs")
    args = p.parse_args()
    rows = {str(r): row(r) for r in args.runs}
    cols = list(next(iter(rows.values())))
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
