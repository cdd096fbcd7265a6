"""Compute precision of a role: bf16 autocast over fp32 weights (the optimizer keeps fp32 master weights, as
DeepSpeed's bf16 mode does), or plain fp32. Pure torch."""
from __future__ import annotations

import contextlib

import torch


def compute_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `setting` on `device` (None: fp32). `auto`: bf16 on a CUDA device that supports it,
    fp32 elsewhere; `bf16` is honoured on the CPU too (autocast on CPU), `meta` computes nothing and stays fp32."""
    device = torch.device(device)
    if setting == "fp32" or device.type == "meta":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"precision {setting!r}: expected auto, fp32 or bf16")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context running the enclosed forward passes in `dtype` on `device` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
