"""Does the frozen world retriever know a wrong claim when it sees one?

For test images, a true caption naming 1 or 2 of the image's objects (optionally without positions or sizes)
is scored against the same caption with one attribute replaced by a value no object of the image has (a
hallucination). Prints, per attribute, how often the true caption scores higher with the image and the mean
gap in logits (logit_scale * cosine).

    python benchmarks/retriever_claim_probe.py [--world-dir raycap/assets/world] [--images 600]
"""
from __future__ import annotations

import argparse
import dataclasses
import random

import torch

from raycap.config import ASSETS_DIR
from raycap.data.world import ATTRIBUTES, position_word
from raycap.models.loading import load_world_dir


def hallucinate(obj, attr: str, value: str, grid: int):
    if attr == "position":
        r, c = next((r, c) for r in range(grid) for c in range(grid) if position_word(r, c, grid) == value)
        return dataclasses.replace(obj, row=r, col=c)
    return dataclasses.replace(obj, **{attr: value})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-dir", default=str(ASSETS_DIR / "world"))
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pw = load_world_dir(args.world_dir)
    world, cfg = pw.world, pw.world.config
    rng = random.Random(args.seed)
    scenes = [world.scene("test", i) for i in range(args.images)]
    grid = scenes[0].grid
    with torch.no_grad():
        emb = pw.retriever.encode_pixels(world.images("test", range(args.images)))
    values = {"shape": cfg.shapes, "colour": cfg.colours, "size": ["small", "large"],
              "position": sorted({position_word(r, c, grid) for r in range(grid) for c in range(grid)})}
    print(f"{'caption':34s} {'attribute':9s} true wins   logit gap   n")
    for drop in (frozenset(), frozenset({"position"}), frozenset({"size", "position"})):
        for n_objects in (1, 2):
            for attr in (a for a in ATTRIBUTES if a not in drop):
                texts, owners = [], []
                for i, scene in enumerate(scenes):
                    if len(scene.objects) < n_objects:
                        continue
                    objs = list(scene.objects[:n_objects])
                    k = rng.randrange(n_objects)
                    wrong = [v for v in values[attr] if v not in {o.attr(attr, grid) for o in scene.objects}]
                    if not wrong:
                        continue
                    changed = objs.copy()
                    changed[k] = hallucinate(objs[k], attr, rng.choice(wrong), grid)
                    texts += [scene.describe(objs, drop), scene.describe(changed, drop)]
                    owners.append(i)
                with torch.no_grad():
                    t = pw.retriever.encode_captions(texts).view(len(owners), 2, -1)
                s = float(pw.retriever.logit_scale) * (t * emb[torch.tensor(owners)][:, None]).sum(-1)
                label = f"{n_objects} object(s), without {','.join(sorted(drop)) or '-'}"
                print(f"{label:34s} {attr:9s} {float((s[:, 0] > s[:, 1]).float().mean()):9.3f} "
                      f"{float((s[:, 0] - s[:, 1]).mean()):10.2f} {len(owners):5d}")


if __name__ == "__main__":
    main()
