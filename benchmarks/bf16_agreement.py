"""Greedy captions in bf16 autocast against fp32 on the shipped world's captioner: the share of images whose
caption is identical, and the decode time ratio fp32 / bf16, in one run.

    python benchmarks/bf16_agreement.py                    # CPU autocast, 1000 validation images
    python benchmarks/bf16_agreement.py --device cuda      # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch

from raycap.config import ASSETS_DIR
from raycap.models.loading import load_world_dir
from raycap.models.precision import autocast
from raycap.supervised.captioner import caption_embeddings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--split", default="val")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    w = load_world_dir(ASSETS_DIR / "world")
    w.captioner.to(dev).eval()
    w.retriever.to(dev)
    n = min(args.images, w.world.config.split_size(args.split))
    emb = w.retriever.encode_pixels(w.world.images(args.split, range(n)))

    def decode(dtype):
        t = time.perf_counter()
        with autocast(dev, dtype):
            caps = caption_embeddings(w.captioner, w.tokenizer, emb)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return caps, time.perf_counter() - t

    decode(torch.bfloat16)  # warm-up
    fp32, t32 = decode(None)
    bf16, t16 = decode(torch.bfloat16)
    print(f"images: {n} ({args.split}, {dev})")
    print(f"agreement: {sum(a == b for a, b in zip(fp32, bf16)) / n:.3f}")
    print(f"fp32_s: {t32:.3f}")
    print(f"bf16_s: {t16:.3f}")
    print(f"ratio: {t32 / t16:.2f}")


if __name__ == "__main__":
    main()
