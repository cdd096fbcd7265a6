"""The P@1 / faithfulness trade-off of what issue 20 tried, as a PNG (benchmarks/faithfulness_tradeoff.png).

Every point is a validation measurement (1,000 images, seed 0) listed with its command in benchmarks/RESULTS.md
("Faithful DiscriTune"); run dirs given on the command line add their last validation evaluation.

    python benchmarks/faithfulness_tradeoff.py [--out benchmarks/faithfulness_tradeoff.png] [RUN ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SUPERVISED = 0.397  # validation P@1 of the shipped supervised captioner (greedy)
TARGET_P1 = SUPERVISED + 0.7 * (1 - SUPERVISED)  # a 70% error cut on validation

# (label, val P@1, val faithful, group): RESULTS.md "Faithful DiscriTune", seed 0
POINTS = [
    ("supervised, greedy", 0.397, 0.769, "start"),
    ("previous world-demo", 0.824, 0.364, "reward term"),
    ("substitution check x1", 0.840, 0.378, "reward term"),
    ("substitution check x3", 0.877, 0.404, "reward term"),
    ("substitution check x10", 0.593, 0.455, "reward term"),
    ("phrase grounding x1", 0.680, 0.483, "reward term"),
    ("pool reward (update 100)", 0.785, 0.279, "reward term"),
    ("patch-token captioner (update 200)", 0.484, 0.43, "captioner"),
    ("best of 8, pool", 0.704, 0.574, "best of n"),
    ("best of 8, pool + 0.5 cos (update 100)", 0.536, 0.730, "best of n"),
    ("best of 16, pool + 0.2 cos + 3 check", 0.528, 0.738, "best of n"),
    ("supervised + select 16", 0.657, 0.817, "select"),
    ("world-demo: best of 8, pool + select 16", 0.874, 0.679, "select"),
]

LABEL_OFFSETS = {  # points whose labels would overlap another's
    "best of 8, pool + 0.5 cos (update 100)": (5, -11),
    "previous world-demo": (5, -11),
    "world-demo: best of 8, pool + select 16": (-6, 6),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "faithfulness_tradeoff.png")
    p.add_argument("--point", action="append", default=[], metavar="LABEL=P1,FAITHFUL",
                   help="another measured point (group 'select')")
    args = p.parse_args(argv)
    points = list(POINTS)
    for spec in args.point:
        label, _, xy = spec.rpartition("=")
        x, y = (float(v) for v in xy.split(","))
        points.append((label, x, y, "select"))
    for run in args.runs:
        evals = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if line and "eval" in json.loads(line)]
        points.append((run.name, evals[-1]["p_at_1"], evals[-1]["faithful"], "run"))
    colours = {"start": "black", "reward term": "tab:red", "captioner": "tab:purple", "best of n": "tab:blue",
               "select": "tab:green", "run": "tab:orange"}
    fig, ax = plt.subplots(figsize=(9, 6.5))
    ax.axvspan(TARGET_P1, 1.0, ymin=0, ymax=1, color="0.93")
    ax.axhline(0.85, color="0.5", ls="--", lw=1)
    ax.text(0.99, 0.86, "faithful 0.85 (the goal)", ha="right", va="bottom", fontsize=8, color="0.4")
    ax.text(TARGET_P1 + 0.005, 0.02, "70% error cut", fontsize=8, color="0.4")
    for label, x, y, group in points:
        ax.scatter([x], [y], color=colours[group], s=36, zorder=3)
        dx, dy = LABEL_OFFSETS.get(label, (5, 4))
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha="right" if dx < 0 else "left")
    for group, colour in colours.items():
        if any(g == group for *_, g in points):
            ax.scatter([], [], color=colour, label=group)
    ax.set_xlim(0.35, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("validation P@1 among 100")
    ax.set_ylabel("validation faithful (every claim true)")
    ax.set_title("Shapes world: retrieval against faithfulness (issue 20, seed 0)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
