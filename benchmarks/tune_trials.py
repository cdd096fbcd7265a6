"""Where a search's trials should run on a small machine: the reference loop inside the trial (`local`) or the Ray
runtime's actors in a placement group per trial (`ray`). Both run the same search (same space, seed, draws and
budget: 2 trials of world-demo at batch 100, two at a time, each trial 1 CPU) and the script prints each
one's wall time and `ratio: X.XX` = ray / local (above 1: the reference loop is faster).

    python benchmarks/tune_trials.py [--steps 30] [--out runs/bench-tune]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml


def space(path: Path, runtime: str, steps: int) -> Path:
    spec = {"config": "world-demo",
            "set": {"rl.steps": steps, "eval.every": steps, "eval.images": 500, "eval.report": False,
                    # the ray runtime's four processes share the trial's 1 CPU as the local trial's one process does
                    "runtime.cpus_per_learner": 0.25, "runtime.cpus_per_rollout": 0.25,
                    "runtime.cpus_per_reward": 0.25},
            "params": {"rl.algorithm.kl_coef": {"choice": [0.1, 0.3]}},
            "search": {"num_samples": 2, "max_concurrent": 2, "grace_period": steps, "trial_runtime": runtime,
                       "cpus_per_trial": 1, "seed": 0}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    from raycap.tune import main as tune_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="updates per trial (default 30)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-tune"))
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    wall = {}
    for runtime in ("local", "ray"):
        t = time.perf_counter()
        summary = tune_main(["--space", str(space(args.out / f"{runtime}.yaml", runtime, args.steps)),
                             "--out", str(args.out / runtime), "--min-wellformed", "-1"])
        wall[runtime] = time.perf_counter() - t
        assert all(r["step"] == args.steps for r in summary["trials"]), summary["trials"]
    print(f"2 trials x {args.steps} updates of world-demo, 2 at a time on 1 CPU each (whole search: start, trials, "
          "test evaluation of the best)")
    for runtime, s in wall.items():
        print(f"  trials on the {runtime:5s} runtime  {s:7.1f} s")
    print(f"ratio: {wall['ray'] / wall['local']:.2f}  (ray / local wall time)")


if __name__ == "__main__":
    main()
