"""`python -m raycap.card`: a retriever's card, the properties of a real CLIP both methods lean on (JSON).

    raycap card --world-dir raycap/assets/world-v2         # the world's retriever: retrieval, binding,
                                                            # specificity, generic gap, the captioner-input probe
    raycap card --config coco-clipcap --set data.path=...   # any open_clip retriever on your own labelled data:
                                                            # P@1 with references and the generic gap

The world's card reads the world's scenes (a measurement, never a training signal): raycap.metrics.card.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raycap.commands import prog
from raycap.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.card"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--world-dir", type=Path, help="a pretrained world dir (world.json, retriever/)")
    src.add_argument("--config", help="a run config (named or YAML) whose data and retriever to card")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run config field")
    p.add_argument("--images", type=int, default=1000, help="test images (at least 100: P@1 among 100)")
    p.add_argument("--probe-images", type=int, default=20000, help="world: train images the probe learns from")
    p.add_argument("--image-tokens", action="store_true", help="world: the captioner reads the patch tokens")
    p.add_argument("--split", default="test", choices=["val", "test"], help="--config: the split to card")
    p.add_argument("--out", type=Path, help="also write the card to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        return run(args)


def run(args) -> dict:
    if args.images < 100:
        raise UserError(f"--images {args.images}: P@1 ranks each target among 100 candidates, give at least 100")
    if args.probe_images < 0:
        raise UserError(f"--probe-images: must be >= 0 (0: no probe), got {args.probe_images}")
    from raycap.progress import quiet_library_progress

    quiet_library_progress()  # no weight-loading bars around the card
    if args.world_dir is not None:
        from raycap.metrics.card import retriever_card
        from raycap.models.loading import load_world_dir

        pw = load_world_dir(args.world_dir)
        if pw.world.config.n_test < 100:
            raise UserError(f"{args.world_dir}: its test split has {pw.world.config.n_test} images, fewer than 100")
        card = retriever_card(pw.retriever, pw.world, args.images, args.probe_images, args.image_tokens, args.seed)
    else:
        from raycap.config import load_config
        from raycap.inputs import load_retriever, open_splits
        from raycap.metrics.card import dataset_card

        cfg = load_config(args.config, args.set)
        retriever = load_retriever(cfg.retriever).eval()
        split = open_splits(cfg, retriever, for_run=False)[args.split]  # a card, not a run: no rl sizes
        n = min(args.images, len(split.source))
        if n < 100:
            raise UserError(f"the {args.split} split has {len(split.source)} images, fewer than 100")
        refs = [split.source.references(i) for i in range(n)]
        if not all(refs):
            raise UserError(f"the {args.split} split has images without references: a card needs labelled data")
        card = dataset_card(retriever, split.embeddings, refs, seed=args.seed)
    text = json.dumps(card, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return card


if __name__ == "__main__":
    main()
