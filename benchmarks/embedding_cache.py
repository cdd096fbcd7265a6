"""Cached image embeddings vs re-encoding pixels every RL step, at ViT-B/32 size (random weights, this CPU).

    python benchmarks/embedding_cache.py [--repeats 3] [--batch 100] [--lm-layers 4] [--lm-width 128]
                                         [--build-images 512] [--threads 2]

Both variants run the same DiscriTune update on a batch of images (sample captions from a ClipCap on the 512-d
image embeddings, score them with the retriever's text tower against the batch, REINFORCE + KL guard, Adam
step). `cached` reads the batch's embeddings from memory (raycap: `raycap.data.cache`); `re-encode` first runs
the image tower on the batch's preprocessed pixels, as ClipCap/EGG-style loops do (pixels already decoded and
in memory, which favours it: no JPEG decoding is counted). Prints both medians, their ratio, and the cache build
rate (Ray Data builder, and the in-process one) on JPEG files written to a temp dir.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_models(lm_layers: int, lm_width: int, max_new_tokens: int):
    import open_clip

    from raycap.data.world import WorldConfig
    from raycap.models.clip import OpenClipTokenizer, Retriever
    from raycap.models.clipcap import ClipCap, ClipCapConfig
    from raycap.models.tokenizers import world_tokenizer

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    retriever = Retriever(model, OpenClipTokenizer("ViT-B-32"), {"source": "open_clip", "name": "ViT-B-32"}).freeze()
    tok = world_tokenizer(WorldConfig().vocabulary())  # the captioner's words; the retriever re-tokenizes its text
    lm = {"n_embd": lm_width, "n_layer": lm_layers, "n_head": max(1, lm_width // 64), "n_positions": 64,
          "vocab_size": len(tok), "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id}
    policy = ClipCap(ClipCapConfig(clip_dim=retriever.embed_dim, prefix_length=10, lm=lm, train_lm=True,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   max_new_tokens=max_new_tokens))
    return retriever, policy, tok


def make_update(retriever, policy, tok, batch: int):
    import copy

    from raycap.config import load_config
    from raycap.data import distractors
    from raycap.models.tokenizers import decode
    from raycap.rl import algorithm, rewards

    cfg = load_config("world-demo", [f"rl.batch_size={batch}", f"rl.reward.num_candidates={batch}"])
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
    scale = float(retriever.logit_scale)

    def update(img: torch.Tensor, step: int) -> None:
        caps = algorithm.rollout(policy, img, cfg, step)
        with torch.no_grad():
            text = retriever.encode_captions(decode(tok, caps.tokens, caps.lengths, policy.stop_ids))
        cands = distractors.candidates(torch.arange(len(img)), img, num_candidates=len(img),
                                       generator=torch.Generator().manual_seed(step))
        reward = rewards.compute("discriminative", text, img, cands, scale)
        loss, _ = algorithm.reinforce_loss(policy, reference, img, caps.tokens, caps.lengths, reward - reward.mean(),
                                           cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return update


def time_updates(args, retriever, update, pixels, cache):
    rng = np.random.default_rng(0)
    times = {"cached": [], "re-encode": []}
    for rep in range(args.repeats + 1):  # the first round warms up
        idx = torch.from_numpy(rng.choice(len(cache), size=args.batch, replace=False))
        for name in ("cached", "re-encode"):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            if name == "cached":
                img = cache[idx]
            else:
                with torch.no_grad():
                    img = retriever.encode_image(pixels[idx]).float()
            update(img, rep)
            if rep:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build_rate(retriever, n: int, builder: str, root: Path) -> float:
    from PIL import Image

    from raycap.data.cache import image_embeddings
    from raycap.data.sources import FileSource, Record

    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        path = root / f"{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(path, quality=90)
        records.append(Record(str(i), path))
    t = time.perf_counter()
    image_embeddings(retriever, FileSource(f"bench:{builder}", records, False), builder=builder, use_cache=False,
                     log=lambda *_: None)
    return n / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--pool", type=int, default=200, help="images whose pixels and embeddings are held")
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-width", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--build-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    print("command: python benchmarks/embedding_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    retriever, policy, tok = build_models(args.lm_layers, args.lm_width, args.max_new_tokens)
    update = make_update(retriever, policy, tok, args.batch)
    pixels = torch.randn(args.pool, 3, retriever.image_size, retriever.image_size)
    with torch.no_grad():
        cache = torch.cat([retriever.encode_image(pixels[k:k + 50]).float() for k in range(0, args.pool, 50)])
    t = time_updates(args, retriever, update, pixels, cache)
    print(f"one update, batch {args.batch}, ViT-B/32 + ClipCap ({args.lm_layers}x{args.lm_width} GPT-2, prefix 10, "
          f"{args.max_new_tokens} new tokens), {args.threads} threads, median of {args.repeats}:")
    print(f"  cached embeddings      {t['cached'] * 1000:8.0f} ms")
    print(f"  re-encode pixels       {t['re-encode'] * 1000:8.0f} ms")
    print(f"ratio re-encode / cached: {t['re-encode'] / t['cached']:.1f}x")
    import ray

    with tempfile.TemporaryDirectory(prefix="raycap-cache-bench-") as tmp:
        local = build_rate(retriever, args.build_images, "local", Path(tmp))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            rayrate = build_rate(retriever, args.build_images, "ray", Path(tmp))
        finally:
            ray.shutdown()
    print(f"cache build, {args.build_images} JPEG files 320x256 -> ViT-B/32: Ray Data {rayrate:.1f} images/s, "
          f"in-process {local:.1f} images/s")


if __name__ == "__main__":
    main()
