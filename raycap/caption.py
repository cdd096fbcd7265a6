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

from raycap.config import ASSETS_DIR
from raycap.errors import UserError, exit_on_user_error
from raycap.progress import quiet_library_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raycap.caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--captioner", type=Path, default=ASSETS_DIR / "world" / "captioner",
                   help="captioner dir (default: the shipped supervised world captioner)")
    p.add_argument("--retriever", type=Path, help="retriever dir (default: the shipped world retriever)")
    p.add_argument("--retriever-name", help="an open_clip model name instead, e.g. ViT-B-32")
    p.add_argument("--pretrained", help="its open_clip pretrained tag or checkpoint file")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print a JSON list of {image, caption} instead of lines")
    return p


@torch.no_grad()
def caption_files(args) -> tuple[list[dict], list[str]]:
    """({image, caption} for every readable file, one-line errors for the others)."""
    from raycap.data.sources import BadImage, load_image
    from raycap.inputs import load_captioner
    from raycap.models.clip import Retriever
    from raycap.models.tokenizers import decode

    if args.retriever_name:
        retriever = Retriever.load(name=args.retriever_name, pretrained=args.pretrained).freeze()
    else:
        retriever = Retriever.load(path=str(args.retriever or ASSETS_DIR / "world" / "retriever")).freeze()
    captioner, tokenizer = load_captioner(args.captioner)
    if captioner.config.clip_dim != retriever.embed_dim:
        raise UserError(f"--captioner {args.captioner} reads {captioner.config.clip_dim}-d image embeddings but the "
                        f"retriever gives {retriever.embed_dim}-d")
    transform = retriever.preprocess()
    pixels, names, errors = [], [], []
    for path in args.images:
        try:
            pixels.append(transform(load_image(path)))
            names.append(str(path))
        except BadImage as e:
            errors.append(str(e))
    if not pixels:
        return [], errors
    emb = retriever.encode_image(torch.stack(pixels)).float()
    out = captioner.eval().generate(emb, mode=args.decoding, num_beams=args.num_beams)
    captions = decode(tokenizer, out.tokens, out.lengths, captioner.stop_ids)
    return [{"image": n, "caption": c} for n, c in zip(names, captions)], errors


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        if args.num_beams < 1:
            raise UserError(f"--num-beams {args.num_beams}: must be >= 1")
        if not args.captioner.is_dir():
            raise UserError(f"--captioner {args.captioner}: no such directory")
        if args.pretrained and not args.retriever_name:
            raise UserError("--pretrained needs --retriever-name (the open_clip model it belongs to)")
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
