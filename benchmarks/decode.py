"""Decoding throughput: raycap's decoder (`raycap.models.decode`: a static KV cache with a CUDA graph on CUDA, HF's
growing cache in its own loop elsewhere), its static cache forced on, HF `generate` (dynamic cache) and
recomputing the whole sequence every token (the ClipCap/EGG-style loop), all greedy on the same weights and
the same prefixes, interleaved in one run; prints the median of each and `ratio: X.XX` = HF generate / ours.

    python benchmarks/decode.py                      # world-size ClipCap (4 x 128 GPT-2), batch 100, 20 tokens
    python benchmarks/decode.py --size gpt2 --tokens 40   # GPT-2 124M (random weights), paper scale

On CUDA the static decoder replays one step as a CUDA graph; on a CPU the gain is not expected (DESIGN.md).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.decode import StaticDecoder

SIZES = {"world": dict(vocab_size=64, n_embd=128, n_layer=4, n_head=4, n_positions=64), "gpt2": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="world")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**SIZES[args.size], eos_token_id=None, bos_token_id=None))
    clip_dim = 512 if args.size == "gpt2" else 64
    cap = ClipCap(ClipCapConfig(clip_dim=clip_dim, prefix_length=10 if args.size == "gpt2" else 4, lm={},
                                max_new_tokens=args.tokens), lm=lm).eval().to(dev)
    x = torch.randn(args.batch, clip_dim, device=dev)
    ours = StaticDecoder(cap)  # the device's default: static cache (+ CUDA graph) on CUDA, HF's growing cache on CPU
    static = StaticDecoder(cap, static=True)
    prefix = cap.prefix(x)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    variants = {
        "ours": lambda: ours.generate(x),
        "ours, static cache": lambda: static.generate(x),
        "HF generate": lambda: cap.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=args.tokens,
                                               min_new_tokens=args.tokens, do_sample=False, pad_token_id=0),
        "no cache (recompute)": lambda: cap.generate(x, use_cache=False),
    }
    with torch.no_grad():
        assert ours.generate(x).tokens.tolist() == cap.generate(x).tokens.tolist()  # same captions
        assert static.generate(x).tokens.tolist() == cap.generate(x).tokens.tolist()
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):  # the first round warms up (and captures the graph)
            for name, run in variants.items():
                sync()
                t = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} ({args.threads} threads); "
          f"{args.size}, batch {args.batch}, {args.tokens} tokens, median of {args.repeats}")
    for name, t in med.items():
        print(f"  {name:22s} {t * 1000:8.1f} ms")
    print(f"ours = {'static cache, one step replayed as a CUDA graph' if ours.static else 'HF growing cache'} "
          "on this device")
    print(f"ratio: {med['HF generate'] / med['ours']:.2f}  (HF generate / ours); "
          f"no-cache / ours: {med['no cache (recompute)'] / med['ours']:.2f}; "
          f"static cache / ours: {med['ours, static cache'] / med['ours']:.2f}")


if __name__ == "__main__":
    main()
