"""The one device policy of every role: where its models and tensors live. Pure torch; the caller passes in the
GPUs a scheduler gave the role (`raycap.runtime.resources.role_device` reads them from Ray)."""
from __future__ import annotations

from typing import Sequence

import torch

from raycap.errors import UserError


def resolve_device(setting: str = "auto", gpu_ids: Sequence | None = None, cuda_count: int | None = None) -> torch.device:
    """`auto`: inside Ray (`gpu_ids` given, the role's assigned GPUs) its first GPU, which Ray exposes as cuda:0,
    or the CPU when it was given none; outside Ray (`gpu_ids` None) cuda when a GPU is visible, else the CPU.
    Any other setting (`cpu`, `cuda`, `cuda:1`, `meta`) is used as given. `cuda_count` defaults to what torch sees."""
    if setting != "auto":
        try:
            return torch.device(setting)
        except RuntimeError:
            raise UserError(f"device {setting!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if gpu_ids is not None:
        return torch.device("cuda", 0) if len(gpu_ids) else torch.device("cpu")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    return torch.device("cuda", 0) if count else torch.device("cpu")
