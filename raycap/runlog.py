"""A run directory's log: metrics.jsonl (one record per step) and TensorBoard scalars, shared by both runtimes."""
from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, out: Path):
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))
        self.file = (Path(out) / "metrics.jsonl").open("a")

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
