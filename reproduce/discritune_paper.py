"""DiscriTune as the paper runs it (`world-paper`) beside the demo, over seeds, and the successor's distractor
curriculum against fixed hard distractors (Gaur et al. 2024, "No Detail Left Behind").

    python reproduce/discritune_paper.py --out runs/paper-table --seeds 0 1 2 [--demo-runs runs/demo-s0 ...]

Arms (each `raycap train --config world-paper --runtime local --set seed=N` plus the arm's settings):
  paper-greedy      the paper's greedy rollouts, 10 hard distractors throughout
  paper-sampled     raycap's sampled rollouts instead
  paper-curriculum  greedy rollouts; bags of random, then medium (the target's 21st-30th nearest images), then
                    hard (its 10 nearest) distractors for 1/9, 3/9 and 5/9 of the updates (the successor's 2, 6
                    and 10 epochs)
Every captioner (the shipped supervised one, each arm's runs, the demo's runs if given) is scored on the test split by
`raycap evaluate --hard-distractors 10` (P@1 among 100 random images, and with 10 of them the target's nearest).
Writes OUT/settings.json, OUT/ARM-sN/ (the runs), OUT/*-test.json, OUT/paper.md and OUT/paper.png; each step is
skipped when its output exists (re-running resumes); `--table-only` rebuilds the table and figure from OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from raycap.config import WORLD_DIR
from reproduce_common import check_same_settings, sh, stage_done

CURRICULUM = ("[{updates: 33}, {updates: 100, hard_distractors: 10, skip_nearest: 20}, "
              "{updates: 167, hard_distractors: 10}]")
ARMS = {
    "paper-greedy": ("world-paper: greedy rollouts, 10 hard distractors", []),
    "paper-sampled": ("world-paper, sampled rollouts", ["rl.sampling.rollout=sample"]),
    "paper-curriculum": ("world-paper, random -> medium -> hard distractors",
                         ["rl.reward.hard_distractors=0", f"rl.reward.curriculum={CURRICULUM}"]),
}
HARD = 10
COLUMNS = [("p_at_1", "P@1"), (f"p_at_1_hard{HARD}", f"P@1, {HARD} hard"), ("wellformed", "wellformed"),
           ("faithful", "faithful"), ("bleu4", "BLEU-4"), ("cider", "CIDEr"), ("rl_seconds", "RL s")]


def evaluate(out: Path, name: str, captioner: Path) -> None:
    result = out / f"{name}-test.json"
    if not result.exists():
        sh("evaluate", "--captioner", str(captioner), "--dataset", "world:test", "--hard-distractors", str(HARD),
           "--json", str(result), log=out / f"{name}-test.log")


def run_all(out: Path, seeds: list[int], arms: list[str], demo_runs: list[Path]) -> None:
    evaluate(out, "supervised", WORLD_DIR / "captioner")
    for seed in seeds:
        for arm in arms:
            run = out / f"{arm}-s{seed}"
            if not stage_done(run / "final_metrics.json", "p_at_1"):
                sets = [a for s in [f"seed={seed}", "eval.test_table=false", "eval.report=false", *ARMS[arm][1]]
                        for a in ("--set", s)]
                sh("train", "--config", "world-paper", "--runtime", "local", "--out", str(run), *sets,
                   log=out / f"{arm}-s{seed}.log")
            evaluate(out, f"{arm}-s{seed}", run / "final")
    for run in demo_runs:
        evaluate(out, f"demo-{run.name}", run / "final")


def rows(out: Path) -> dict[str, list[dict]]:
    """{row label: [test metrics (with the run's RL seconds) per run]}: supervised, each arm, the demo (its run dirs
    as settings.json records them)."""
    found: dict[str, list[dict]] = {}
    saved = out / "settings.json"
    demo_runs = json.loads(saved.read_text()).get("demo_runs", {}) if saved.exists() else {}
    for path in sorted(out.glob("*-test.json")):
        name = path.name.removesuffix("-test.json")
        metrics = json.loads(path.read_text())
        label = ("supervised" if name == "supervised" else "demo" if name.startswith("demo-")
                 else name.rsplit("-s", 1)[0])
        run = Path(demo_runs.get(name, out / name))
        if (run / "final_metrics.json").exists():
            metrics["rl_seconds"] = json.loads((run / "final_metrics.json").read_text()).get("rl_seconds")
        found.setdefault(label, []).append(metrics)
    order = ["supervised", *ARMS, "demo"]
    return {k: found[k] for k in order if k in found}


def cell(values: list, fmt: str = "{:.3f}") -> str:
    """mean (min-max) of the numbers among `values`; the value alone for one; "-" for none."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(found: dict[str, list[dict]]) -> str:
    lines = ["| captioner (test, greedy) | runs | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for label, runs in found.items():
        name = ARMS[label][0] if label in ARMS else "world-demo (greedy; its select row is the demo)" \
            if label == "demo" else "supervised (shipped)"
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(
            cell([m.get(k) for m in runs], "{:.0f}" if k == "rl_seconds" else "{:.3f}") for k, _ in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def figure(found: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(found)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for shift, (key, label) in zip((-0.2, 0.2), COLUMNS[:2]):
        values = [[m[key] for m in found[n]] for n in names]
        mean = np.array([np.mean(v) for v in values])
        err = np.array([mean - [min(v) for v in values], [max(v) for v in values] - mean])
        ax.bar(x + shift, mean, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("test P@1 (mean, min-max)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("DiscriTune as the paper runs it, its curriculum, and the demo")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--demo-runs", type=Path, nargs="*", default=[], help="world-demo run dirs to score beside them")
    p.add_argument("--table-only", action="store_true", help="rebuild the table and figure from --out")
    args = p.parse_args(argv)
    if not args.table_only:
        missing = [str(r) for r in args.demo_runs if not (r / "final").is_dir()]
        if missing:
            sys.exit(f"--demo-runs: {missing[0]} has no final/ captioner")
        from raycap.config import load_config

        check_same_settings(args.out, {"config": load_config("world-paper").model_dump(mode="json"),
                                       "arms": {a: sets for a, (_, sets) in ARMS.items()}, "hard": HARD,
                                       "demo_runs": {f"demo-{r.name}": str(r.resolve()) for r in args.demo_runs}})
        run_all(args.out, args.seeds, args.arms, args.demo_runs)
    found = rows(args.out)
    if len(found) < 2:
        sys.exit(f"{args.out}: nothing evaluated beside the supervised captioner yet")
    (args.out / "paper.md").write_text(table(found))
    figure(found, args.out / "paper.png")
    print(table(found), end="")
    print(f"wrote {args.out / 'paper.md'} and {args.out / 'paper.png'}")


if __name__ == "__main__":
    main()
