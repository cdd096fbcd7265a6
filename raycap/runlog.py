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
