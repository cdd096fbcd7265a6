"""Issue 29's table and trade-off plot, read from run directories only (nothing typed in).

Each RUN is a `raycap train` run dir; its greedy row is the run's last validation evaluation (metrics.jsonl),
its select row `RUN/val_select.json` when present (`raycap evaluate --captioner RUN/final --dataset world:val
--decoding select --json RUN/val_select.json`), its RL seconds `final_metrics.json`'s `rl_seconds`. The
supervised captioner's row is the step-0 validation evaluation of the first run (every run logs it before its
first update), and error cuts are against its P@1. Runs sharing a label (`LABEL=RUN`, default: the dir name
without its `-sN` seed suffix) are one row: the mean, with the range over seeds.

    python benchmarks/faithful_policy.py [--png benchmarks/faithful_policy.png] [LABEL=]RUN ...
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

COLUMNS = [("p_at_1", "P@1"), ("error_cut", "P@1 error cut"), ("wellformed", "wellformed"),
           ("faithful", "faithful"), ("faithful_1obj", "1 obj"), ("faithful_2obj", "2 obj"),
           ("faithful_3obj", "3 obj"), ("precision", "precision"), ("recall", "recall")]


def evaluations(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval" in r]


def measured(run: Path) -> dict:
    """{'greedy': metrics, 'select': metrics or None, 'rl_seconds': float or None, 'supervised': metrics}."""
    evals = evaluations(run)
    if not evals:
        raise SystemExit(f"{run}: no validation evaluation in metrics.jsonl")
    first, last = evals[0], evals[-1]
    select = run / "val_select.json"
    final = run / "final_metrics.json"
    return {"greedy": last["eval"], "greedy_step": last["step"],
            "select": json.loads(select.read_text()) if select.is_file() else None,
            "rl_seconds": json.loads(final.read_text()).get("rl_seconds") if final.is_file() else None,
            "supervised": first["eval"] if first["step"] == 0 else None}


def label_of(spec: str) -> tuple[str, Path]:
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, Path(path)
    path = Path(spec)
    return re.sub(r"-s\d+$", "", path.name), path


def cell(values: list[float], percent: bool = False, digits: int = 3) -> str:
    fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.{digits}f}")
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ({fmt(min(values))}-{fmt(max(values))})"


def table(groups: dict[str, list[dict]], supervised_p1: float) -> list[str]:
    head = ["validation", "decoding", "seeds"] + [name for _, name in COLUMNS] + ["RL s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, runs in groups.items():
        for decoding in ("greedy", "select"):
            got = [r[decoding] for r in runs if r[decoding] is not None]
            if not got:
                continue
            cells = []
            for key, _ in COLUMNS:
                if key == "error_cut":
                    cells.append(cell([(m["p_at_1"] - supervised_p1) / (1 - supervised_p1) for m in got], True))
                else:
                    cells.append(cell([m[key] for m in got if m.get(key) is not None]))
            seconds = [r["rl_seconds"] for r in runs if r["rl_seconds"] is not None]
            lines.append(f"| {label} | {decoding} | {len(got)} | " + " | ".join(cells)
                         + f" | {cell(seconds, digits=0)} |")
    return lines


def plot(groups: dict[str, list[dict]], supervised: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([supervised["p_at_1"]], [supervised["faithful"]], marker="*", s=160, color="black")
    ax.annotate("supervised, greedy", (supervised["p_at_1"], supervised["faithful"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
    for i, (label, runs) in enumerate(groups.items()):
        colour = f"C{i}"
        for decoding, marker in (("greedy", "o"), ("select", "s")):
            got = [r[decoding] for r in runs if r[decoding] is not None]
            if not got:
                continue
            xs, ys = [m["p_at_1"] for m in got], [m["faithful"] for m in got]
            ax.scatter(xs, ys, marker=marker, color=colour, alpha=0.35, s=25)
            x, y = sum(xs) / len(xs), sum(ys) / len(ys)
            ax.scatter([x], [y], marker=marker, color=colour, s=70, label=f"{label}, {decoding}")
    p0 = supervised["p_at_1"]
    for cut, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(p0 + cut * (1 - p0), color="grey", linestyle=style, linewidth=1)
        ax.text(p0 + cut * (1 - p0), 0.01, f" {int(100 * cut)}% error cut", fontsize=7, color="grey",
                transform=ax.get_xaxis_transform())
    ax.axhline(supervised["faithful"], color="grey", linewidth=0.8)
    ax.axhline(0.85, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("P@1 among 100 (validation)")
    ax.set_ylabel("faithful (validation)")
    ax.set_title("Faithful policy: greedy (circles) and select 16 (squares); small marks are seeds")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN")
    p.add_argument("--png", type=Path, help="also write the P@1 / faithful plot here")
    args = p.parse_args(argv)
    groups: dict[str, list[dict]] = defaultdict(list)
    supervised = None
    for spec in args.runs:
        label, run = label_of(spec)
        got = measured(run)
        groups[label].append(got)
        supervised = supervised or got["supervised"]
    if supervised is None:
        raise SystemExit("no run logged its step-0 (supervised captioner) validation evaluation")
    print(f"supervised captioner, greedy (step 0 of the runs): P@1 {supervised['p_at_1']:.3f}, "
          f"faithful {supervised['faithful']:.3f}")
    print("\n".join(table(groups, supervised["p_at_1"])))
    if args.png:
        plot(groups, supervised, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
