"""Short training runs on the tiny world, shared by the runtime and resume tests: small batches, short
captions, one evaluation of 100 images, one thread per process."""
import json

from raycap.train import main as train_main

SHORT = ["--set", "eval.images=100", "--set", "rl.sampling.max_new_tokens=8", "--set", "eval.every=100", "--set",
         "threads=1",
         "--set", "rl.batch_size=24", "--set", "rl.reward.num_candidates=24"]
# the report and test table have their own tests (test_report.py); the select decoding's 64 samples per image run
# in the SHORT runs (conftest.printed_ray_run): FAST runs' final evaluations take 4
FAST = [*SHORT, "--set", "eval.report=false", "--set", "eval.test_table=false", "--set", "eval.select_samples=4"]


def world_sets(world) -> list[str]:
    """`--set` values that point a run config at a pretrained world dir: its world, retriever and captioner."""
    return [f"data.path={world}", f"retriever.path={world}/retriever", f"captioner.path={world}/captioner"]


def world_args(world) -> list[str]:
    return [a for s in world_sets(world) for a in ("--set", s)]


def run(world, out, *extra, runtime="ray"):
    """`python -m raycap.train` of world-demo on `world` into `out`, with FAST settings and `extra` args."""
    return train_main(["--config", "world-demo", "--out", str(out), "--runtime", runtime,
                       *world_args(world), *FAST, *extra])


def records(out):
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
