"""Short training runs on the tiny world, shared by the runtime and resume tests: small batches, short
captions, one evaluation of 100 images, one thread per process."""
import json

from raycap.train import main as train_main

FAST = ["--set", "eval_images=100", "--set", "max_new_tokens=8", "--set", "eval_every=100", "--set", "threads=1",
        "--set", "batch_size=24", "--set", "num_candidates=24"]


def run(world, out, *extra, runtime="ray"):
    """`python -m raycap.train` of world-demo on `world` into `out`, with FAST settings and `extra` args."""
    return train_main(["--config", "world-demo", "--out", str(out), "--runtime", runtime,
                       "--set", f"world_dir={world}", *FAST, *extra])


def records(out):
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
