"""Kill a rollout worker mid-run, then kill the whole run and resume it; print what survived.

    python benchmarks/fault_tolerance.py --out runs/fault [--steps 40] [--set key=value ...]

1. starts `python -m raycap.train --config world-demo` (Ray runtime), waits for update `steps/4`, and SIGKILLs
   the RolloutWorker process (found by its Ray process title `ray::RolloutWorker`); the run must finish with
   every update done and one actor restart reported;
2. starts a longer run in the same directory (it resumes), waits for update `1.6 * steps`, SIGKILLs the
   driver and every Ray process, and starts it again: it must resume from the last checkpoint and finish
   with one record per step in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return -1
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else -1


def pids(title: str) -> list[int]:
    res = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split()]


def start(out: Path, steps: int, eval_every: int, extra: list[str], log):
    """The run, extended later only in `steps` (a re-run with any other change is refused)."""
    cmd = [sys.executable, "-m", "raycap.train", "--config", "world-demo", "--out", str(out),
           "--set", f"rl.steps={steps}", "--set", "checkpoint_every=10", "--set", f"eval.every={eval_every}", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def wait_for(out: Path, step: int, proc, timeout: float = 1200):
    t = time.time()
    while last_step(out) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (rc {proc.returncode}) before step {step}")
        if time.time() - t > timeout:
            raise TimeoutError(f"no step {step} after {timeout} s")
        time.sleep(0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    extra = [x for kv in args.set for x in ("--set", kv)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "fault_tolerance.log").open("a")

    proc = start(args.out, args.steps, args.steps, extra, log)
    wait_for(args.out, args.steps // 4, proc)
    victims = pids("ray::RolloutWorker")
    killed_at = last_step(args.out)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    rc = proc.wait()
    final = json.loads((args.out / "final_metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    lost = args.steps - final["updates"]
    print(f"rollout worker pid(s) {victims} SIGKILLed after update {killed_at}: rc {rc}, "
          f"{final['updates']} of {args.steps} updates done ({lost} lost), actor_restarts {final['actor_restarts']}, "
          f"steps logged 0..{steps[-1]} contiguous: {steps == list(range(args.steps + 1))}")

    longer = 2 * args.steps
    proc = start(args.out, longer, args.steps, extra, log)
    wait_for(args.out, int(1.6 * args.steps), proc)
    killed_at = last_step(args.out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for pid in pids("ray::") + pids("raylet") + pids("gcs_server"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(2)
    proc = start(args.out, longer, args.steps, extra, log)
    rc = proc.wait()
    text = (args.out / "fault_tolerance.log").read_text()
    resumed = [line for line in text.splitlines() if "resuming from" in line][-1]
    steps = [json.loads(line)["step"] for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    print(f"whole run SIGKILLed after update {killed_at}; restarted: rc {rc}, '{resumed.strip()}', "
          f"steps logged 0..{steps[-1]} with one record each: {steps == list(range(longer + 1))}")


if __name__ == "__main__":
    main()
