"""A run directory's log: metrics.jsonl (one record per step) and TensorBoard scalars, shared by both runtimes."""
from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """Opening at `step` (a resumed run) drops the records of later steps, which a killed run wrote after its
    last checkpoint and the resumed run will redo, so the log reads as one run."""

    def __init__(self, out: Path, step: int = 0):
        path = Path(out) / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=step + 1 if step else None)
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        """Append a record (must hold "step"); its float fields, and those of record["eval"], go to TensorBoard."""
        step = record["step"]
        for prefix, fields in (("train", record), ("eval", record.get("eval", {}))):
            for k, v in fields.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def last_checkpoint(out: Path, marker: str) -> Path | None:
    """The newest `out/checkpoints/step-N` holding `marker`, the file a checkpoint writes last (None if none)."""
    done = [p for p in (Path(out) / "checkpoints").glob("step-*") if (p / marker).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run_updates(cfg, out: Path, start: int, update, evaluate, checkpoint, log=print, on_record=None) -> dict:
    """The loop both runtimes share: evaluate at step 0, then `update(step) -> record` for each remaining step
    with evaluations every `eval_every`, checkpoints every `checkpoint_every` (and at the end), the run log,
    and a tqdm bar. Returns the final evaluation with `rl_seconds` and `updates`."""
    import time

    from tqdm import tqdm

    runlog = RunLog(out, start)
    if start == 0:
        initial = evaluate()
        runlog.write({"step": 0, "eval": initial})
        log(f"step 0 (supervised captioner): P@1 {initial['p_at_1']:.3f}, wellformed "
            f"{initial['wellformed']:.3f}, faithful {initial['faithful']:.3f}")
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="rl", dynamic_ncols=True)
    for step in bar:
        t = time.time()
        record = update(step)
        record.setdefault("step_seconds", round(time.time() - t, 3))
        record["step"] = step + 1
        if on_record:
            on_record(record)
        bar.set_postfix(reward=f"{record.get('reward_mean', record.get('clip_cos', 0)):.3f}",
                        p1=f"{record['train_p_at_1']:.2f}", kl=f"{record['kl']:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["eval"] = evaluate()
            log(f"step {step + 1}: " + json.dumps({k: v for k, v in record["eval"].items() if k != "examples"}))
        runlog.write(record)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    final = evaluate() | {"rl_seconds": round(time.time() - t0, 1), "updates": max(0, cfg.steps - start)}
    runlog.close()
    return final
