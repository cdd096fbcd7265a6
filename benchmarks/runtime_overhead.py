"""Ray runtime vs the single-process reference loop: images/s through full RL steps, same models, same data,
same cores, one run (these machines are noisy, so only ratios within one run are meaningful).

    python benchmarks/runtime_overhead.py [--steps 20] [--warmup 3] [--threads 2] [--set key=value ...]

Prints images/s of each variant, the share of a step spent moving weights, and on a line of its own
`ratio: X.XX` = Ray (1 rollout worker, object_store, lag 0) / reference loop.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reference_loop(cfg, steps: int, warmup: int, out) -> list[float]:
    from raycap.local_trainer import LocalTrainer

    trainer = LocalTrainer(cfg, out, log=lambda *_: None)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        trainer.update(step)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def ray_runtime(cfg, steps: int, warmup: int, out) -> tuple[list[float], list[float]]:
    from raycap.runtime.controller import Controller

    controller = Controller(cfg, out, log=lambda *_: None)
    times, sync, pending = [], [], None
    try:
        for step in range(warmup + steps):
            t = time.perf_counter()
            record, pending = controller.run_step(step, pending)
            times.append(time.perf_counter() - t)
            sync.append(record["weight_sync_seconds"])
    finally:
        controller.shutdown()
    return times[warmup:], sync[warmup:]


def main(argv=None):
    import tempfile

    import ray

    from raycap.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--config", default="world-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    base = [f"threads={args.threads}", f"steps={args.warmup + args.steps}", *args.set]
    variants = {
        "reference loop (1 process)": [],
        "ray, 1 rollout worker, object_store": ["runtime.rollout_workers=1"],
        "ray, 2 rollout workers, object_store": ["runtime.rollout_workers=2"],
        "ray, colocated": ["runtime.weight_sync=colocated"],
        "ray, 1 rollout worker, max_policy_lag=1": ["runtime.max_policy_lag=1"],
    }
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    rates, tmp = {}, tempfile.mkdtemp(prefix="raycap-bench-")
    for i, (name, extra) in enumerate(variants.items()):
        cfg = load_config(args.config, base + extra)
        out = f"{tmp}/{i}"
        if i == 0:
            times, sync = reference_loop(cfg, args.steps, args.warmup, out), None
        else:
            times, sync = ray_runtime(cfg, args.steps, args.warmup, out)
        step = statistics.median(times)
        rates[name] = cfg.batch_size / step
        line = f"{name:42s} {rates[name]:7.1f} images/s  (median step {step * 1000:.0f} ms over {len(times)})"
        if sync is not None:
            line += f"  weight movement {100 * statistics.median(sync) / step:.1f}% of a step"
        print(line, flush=True)
    ray.shutdown()
    ref = rates["reference loop (1 process)"]
    print(f"ratio_2_workers: {rates['ray, 2 rollout workers, object_store'] / ref:.2f}")
    print(f"ratio_colocated: {rates['ray, colocated'] / ref:.2f}")
    print(f"ratio_lag1: {rates['ray, 1 rollout worker, max_policy_lag=1'] / ref:.2f}")
    print(f"ratio: {rates['ray, 1 rollout worker, object_store'] / ref:.2f}")


if __name__ == "__main__":
    main()
