"""Gumbel-softmax decoding: captions that stay differentiable all the way into the CLIP text encoder.

Each step samples a straight-through Gumbel-softmax token (one-hot forward, soft gradient backward), feeds
its embedding (`y @ wte`) back into the LM with the KV cache (the captioner's `soft_start` / `soft_step`: ClipCap's
LM after its prefix, a VLM after its prompt and image), and stops a row at the end token. The result goes through
the LM-to-CLIP token map (`raycap.models.vocab`; the identity in the shapes world, where the captioner and CLIP
share one vocabulary) into the frozen CLIP text encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycap.models.decoding import DONE_CHECK_EVERY


@dataclass
class SoftCaptions:
    probs: torch.Tensor       # (N, T, V) straight-through one-hots, zero after the end; the end token included
    tokens: torch.Tensor      # (N, T) hard ids (pad after the end)
    lengths: torch.Tensor     # (N,) tokens including the end token
    logits: torch.Tensor      # (N, T, V) policy logits at each step (for the KL guard)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's shape) on int64 tensors holding values below 2^32; every product stays
    below 2^63, so no step overflows and every device computes the same bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(shape: torch.Size, generator: torch.Generator | None, device) -> torch.Tensor:
    """float32 uniforms in (0, 1) of `shape`, computed on `device` as a hash of each element's index and two
    32-bit seeds drawn from `generator` (a CPU generator): the same seed gives the same numbers on every
    device, and only the two seeds leave the host, not (N, V) floats per token."""
    s1, s2 = torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64).tolist()
    n = math.prod(shape)
    if n >= 1 << 32:
        raise ValueError(f"counter noise indexes below 2^32 elements, asked for {n}")
    h = _mix32(_mix32(torch.arange(n, device=device, dtype=torch.int64) ^ s1) ^ s2)
    return unit_interval(h).view(shape)


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in [2^-24, 1 - 2^-24]: the top 23 bits, centred in their bin (every value exact in
    float32, so never 0 or 1, whose double log is infinite)."""
    return ((h >> 9).float() + 0.5).mul_(2.0 ** -23)


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, generator: torch.Generator | None) -> torch.Tensor:
    """`F.gumbel_softmax` with its uniforms from `counter_uniform` (seeded by `generator`, computed where the
    logits are), so the same seed gives the same captions on CPU and GPU (and a resumed run the same noise)."""
    u = counter_uniform(logits.shape, generator, logits.device)
    g = -torch.log(-torch.log(u))
    y = F.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
    return one_hot - y.detach() + y


def gumbel_decode(captioner, image_inputs: torch.Tensor, eos_id: int, tau: float = 1.0, hard: bool = True,
                  max_new_tokens: int | None = None, generator: torch.Generator | None = None) -> SoftCaptions:
    """Decode with Gumbel-softmax (noise from `generator`, a CPU generator) through the captioner's soft-token
    steps (`soft_start(inputs)`, then `soft_step(probs, cache)` per token: ClipCap's LM after its prefix, a VLM's
    model after its prompt and image); captions that reach max_new_tokens get a forced end token appended."""
    max_new = max_new_tokens or captioner.config.max_new_tokens
    logits, past = captioner.soft_start(image_inputs)
    N, V, dev = logits.shape[0], logits.shape[1], logits.device
    stop = torch.tensor(captioner.stop_ids, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    lengths = torch.zeros(N, dtype=torch.long, device=dev)
    probs, logits_all = [], []
    for t in range(max_new):
        if t:
            logits, past = captioner.soft_step(y, past)
        y = gumbel_softmax(logits, tau, hard, generator)
        y = y * (~done)[:, None]  # finished rows emit nothing
        probs.append(y)
        logits_all.append(logits)
        lengths += (~done).long()
        done |= torch.isin(y.argmax(-1), stop) & (y.sum(-1) > 0)
        if (t + 1) % DONE_CHECK_EVERY == 0 and bool(done.all()):  # the host waits for the device only here
            break
    T = int(lengths.max())  # steps after every row finished emitted nothing: dropped
    probs_t, logits_t = torch.stack(probs, 1)[:, :T], torch.stack(logits_all, 1)[:, :T]
    if not bool(done.all()):  # force an end token after the longest captions
        end = torch.zeros(N, 1, V, device=dev)
        end[~done, 0, eos_id] = 1.0
        probs_t = torch.cat([probs_t, end], 1)
        lengths = lengths + (~done).long()
    tokens = probs_t.argmax(-1).masked_fill(probs_t.sum(-1) == 0, captioner.config.pad_token_id)
    return SoftCaptions(probs_t, tokens, lengths, logits_t)
