"""Bytes one weight sync moves at paper scale: ClipCap (MLP mapper, prefix 10, CLIP width 512) over GPT-2 124M
(`GPT2Config()`, random weights), with the whole LM trained against LoRA adapters (`captioner.lora`, peft's GPT-2
default target c_attn), as `raycap.runtime.weights.flat_weights` packs them; prints both and their ratio.

    python benchmarks/lora_sync_bytes.py              # r=32 (No Detail Left Behind's rank)
    python benchmarks/lora_sync_bytes.py --r 8
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.models import lora
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.runtime.weights import flat_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    args = p.parse_args()
    torch.manual_seed(0)
    cap = ClipCap(ClipCapConfig(clip_dim=512, prefix_length=10, lm={}), lm=GPT2LMHeadModel(GPT2Config()))
    cap.set_trainable(True)
    full = flat_weights(cap).nbytes
    lora.add_lora(cap.lm, args.r, args.alpha)
    cap.set_trainable(True)
    flat = flat_weights(cap)
    adapters = sum(p.numel() for n, p in cap.named_parameters() if "lora_" in n)
    print(f"lm: {sum(p.numel() for n, p in cap.lm.named_parameters() if 'lora_' not in n) / 1e6:.1f}M, mapper: "
          f"{sum(p.numel() for p in cap.mapper.parameters()) / 1e6:.1f}M, adapters (r={args.r}): {adapters / 1e6:.2f}M")
    print(f"full_sync_mb: {full / 2**20:.1f}")
    print(f"lora_sync_mb: {flat.nbytes / 2**20:.1f}")
    print(f"ratio: {full / flat.nbytes:.2f}")


if __name__ == "__main__":
    main()
