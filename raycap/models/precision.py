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


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` in fp32 with autocast off, whatever the inputs' dtypes and the enclosing autocast."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


class FP32Linear(torch.nn.Linear):
    """A linear layer that computes in fp32 whatever autocast is on: an LM head whose logits become log-probs,
    so the decoder's and the learner's log-probs are not bf16-rounded (rounding noise would dominate importance
    ratios at small learning rates, and flip greedy ties between two decoders)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_linear(x, self.weight, self.bias)


def fp32_head(model: torch.nn.Module) -> None:
    """Make the output layer of an HF LM (`get_output_embeddings()`, a plain `nn.Linear`) compute in fp32.
    The layer keeps its parameters (tied weights stay tied) and its state dict; only its class changes."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.__class__ = FP32Linear
