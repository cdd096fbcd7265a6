"""Ray runtime vs the single-process reference loop: images/s through full RL steps, same models, same data,
same cores, one run (these machines are noisy, so only ratios within one run are meaningful).

    python benchmarks/runtime_overhead.py [--steps 30] [--block 5] [--warmup 3] [--threads 2] [--set k=v ...]

Each Ray variant runs in blocks of steps interleaved with blocks of the reference loop (both alive, one
running at a time). Prints images/s of each, the share of a step spent moving weights, and on a line of its
own `ratio: X.XX` = Ray (1 rollout worker, object_store, lag 0) / reference loop, in images/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed_steps(run_step, steps: range) -> list[float]:
    times = []
    for step in steps:
        t = time.perf_counter()
        run_step(step)
        times.append(time.perf_counter() - t)
    return times


def compare(reference, cfg, steps: int, block: int, warmup: int, out) -> dict:
    """Interleave blocks of `block` steps of the reference loop and of a Ray controller (both alive, one
    running at a time) so that drifts in machine load hit both alike; medians over all timed steps."""
    from raycap.runtime.controller import Controller

    controller = Controller(cfg, out, log=lambda *_: None)
    state = {"pending": None, "sync": []}

    def ray_step(step):
        record, state["pending"] = controller.run_step(step, state["pending"])
        state["sync"].append(record["weight_sync_seconds"])

    ref_times, ray_times = [], []
    try:
        timed_steps(ray_step, range(warmup))
        for start in range(warmup, warmup + steps, block):
            ref_times += timed_steps(reference.update, range(start, start + block))
            ray_times += timed_steps(ray_step, range(start, start + block))
    finally:
        controller.shutdown()
    ref, ray_ = statistics.median(ref_times), statistics.median(ray_times)
    return {"ref": ref, "ray": ray_, "sync": statistics.median(state["sync"][warmup:]), "n": len(ray_times)}


def main(argv=None):
    import tempfile

    import ray

    from raycap.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--config", default="world-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    base = [f"threads={args.threads}", f"rl.steps={args.warmup + args.steps + args.block}", *args.set]
    variants = {
        "1 rollout worker, object_store": ["runtime.rollout_workers=1"],
        "2 rollout workers, object_store": ["runtime.rollout_workers=2"],
        "colocated": ["runtime.weight_sync=colocated"],
        "1 rollout worker, max_policy_lag=1": ["runtime.max_policy_lag=1"],
    }
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    tmp = tempfile.mkdtemp(prefix="raycap-bench-")
    from raycap.local_trainer import LocalTrainer

    reference = LocalTrainer(load_config(args.config, base), f"{tmp}/reference", log=lambda *_: None)
    timed_steps(reference.update, range(args.warmup))
    ratios = {}
    for i, (name, extra) in enumerate(variants.items()):
        cfg = load_config(args.config, base + extra)
        r = compare(reference, cfg, args.steps, args.block, args.warmup, f"{tmp}/{i}")
        ratios[name] = r["ref"] / r["ray"]
        print(f"ray, {name:36s} {cfg.rl.batch_size / r['ray']:6.1f} images/s vs reference loop "
              f"{cfg.rl.batch_size / r['ref']:6.1f} (median steps {r['ray'] * 1000:.0f} / {r['ref'] * 1000:.0f} ms, "
              f"{r['n']} each): x{ratios[name]:.2f}; weight movement {100 * r['sync'] / r['ray']:.1f}% of a step",
              flush=True)
    ray.shutdown()
    print(f"ratio_2_workers: {ratios['2 rollout workers, object_store']:.2f}")
    print(f"ratio_colocated: {ratios['colocated']:.2f}")
    print(f"ratio_lag1: {ratios['1 rollout worker, max_policy_lag=1']:.2f}")
    print(f"ratio: {ratios['1 rollout worker, object_store']:.2f}")


if __name__ == "__main__":
    main()
