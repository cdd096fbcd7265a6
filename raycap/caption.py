"""Caption image files with a checkpoint:

    python -m raycap.caption --captioner runs/demo/final IMAGE [IMAGE ...] [--decoding beam] [--json]

Any size or mode PIL reads (resized and cropped by the retriever's own transform); a file that cannot be read gets
one line on stderr and the others are still captioned (exit code 1 if any failed). The retriever whose image
embeddings the captioner reads: `--retriever DIR` (default: the shipped world retriever) or `--retriever-name`
with `--pretrained`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from raycap.config import WORLD_DIR
from raycap.errors import UserError, exit_on_user_error
from raycap.inputs import add_retriever_arguments, check_retriever_arguments
from raycap.progress import quiet_library_progress
from raycap.commands import prog

WORLD_RETRIEVER = WORLD_DIR / "retriever"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.caption"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--captioner", type=Path, default=WORLD_DIR / "captioner",
                   help="captioner dir (default: the shipped supervised world captioner)")
    add_retriever_arguments(p, WORLD_RETRIEVER)
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512, help="sequences decoded at once (images x beams)")
    p.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print a JSON list of {image, caption} instead of lines")
    return p


@torch.no_grad()
def caption_files(args) -> tuple[list[dict], list[str]]:
    """({image, caption} for every readable file, one-line errors for the others)."""
    from raycap.data.sources import BadImage, load_image
    from raycap.inputs import captioner_on_device, retriever_from_arguments

    retriever, retriever_label = retriever_from_arguments(args, WORLD_RETRIEVER)
    captioner, tokenizer, retriever, _ = captioner_on_device(args.captioner, retriever, f"--captioner {args.captioner}",
                                                             retriever_label, args.device)
    names, errors, images = [], [], []
    for path in args.images:
        try:
            images.append(load_image(path))
            names.append(str(path))
        except BadImage as e:
            errors.append(str(e))
    if not images:
        return [], errors
    captions = caption_images(captioner, tokenizer, retriever, images, args.decoding, args.num_beams,
                              args.batch_size)
    return [{"image": n, "caption": c} for n, c in zip(names, captions)], errors


@torch.no_grad()
def caption_images(captioner, tokenizer, retriever, images: list, decoding: str = "greedy", num_beams: int = 5,
                   batch_size: int = 512) -> list[str]:
    """One caption per PIL image: read, encoded (by the retriever, or BLIP's own vision tower) and decoded a batch
    at a time on the captioner's device."""
    from raycap.supervised.captioner import caption_embeddings

    device = next(captioner.parameters()).device
    transform = retriever.preprocess()
    own_features = not getattr(captioner, "reads_retriever_embeddings", True)  # BLIP reads its own vision tower
    step = max(1, batch_size // (num_beams if decoding == "beam" else 1))
    captions = []
    for k in range(0, len(images), step):
        chunk = images[k:k + step]
        if own_features:
            emb = captioner.encode_images(chunk)
        else:
            pixels = torch.stack([transform(image) for image in chunk]).to(device)
            if getattr(captioner, "reads_image_tokens", False):
                emb = retriever.encode_image_tokens(pixels).float()
            else:
                emb = retriever.encode_image(pixels).float()
        captions += caption_embeddings(captioner.eval(), tokenizer, emb, decoding, num_beams, batch_size)
    return captions


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        if args.num_beams < 1:
            raise UserError(f"--num-beams {args.num_beams}: must be >= 1")
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
        if not args.captioner.is_dir():
            raise UserError(f"--captioner {args.captioner}: no such directory")
        check_retriever_arguments(args)
        quiet_library_progress()
        results, errors = caption_files(args)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}\t{r['caption']}")
    if errors:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
