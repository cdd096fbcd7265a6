"""Turn a published captioner into a raycap captioner directory (what `captioner.path` names):

    python -m raycap.convert clipcap coco_weights.pt --tokenizer gpt2 --out captioners/clipcap-coco
    python -m raycap.convert blip Salesforce/blip-image-captioning-base --out captioners/blip-coco

`clipcap`: a checkpoint of the original ClipCap repo (`coco_weights.pt`, `conceptual_weights.pt`: MLP mapper,
prefix 10, GPT-2 124M; `--mapper transformer` for its Transformer variant), read with weights_only=True, with
the LM's tokenizer (`gpt2`, or a local directory). `blip`: a BlipForConditionalGeneration name or directory with
its processor's tokenizer. Names need their files in the local HF cache (download them first on a machine that
is online); every failure is one line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_dir
from raycap.commands import prog


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.convert"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("clipcap", help="an original ClipCap .pt checkpoint")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tokenizer", default="gpt2", help="the LM's tokenizer: a name or directory (default: gpt2)")
    c.add_argument("--lm", default="gpt2", help="the LM architecture (default: gpt2, GPT-2 124M)")
    c.add_argument("--mapper", choices=["mlp", "transformer"], default="mlp")
    c.add_argument("--prefix-length", type=int, default=10)
    c.add_argument("--clip-length", type=int, default=10, help="transformer mapper only")
    c.add_argument("--mapper-layers", type=int, default=8, help="transformer mapper only")
    c.add_argument("--clip-dim", type=int, default=512, help="the CLIP embedding width (ViT-B/32: 512)")
    c.add_argument("--max-new-tokens", type=int, default=40)
    b = sub.add_parser("blip", help="a BlipForConditionalGeneration (HF name or directory)")
    b.add_argument("model")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--tokenizer", default=None, help="default: the model's own")
    b.add_argument("--max-new-tokens", type=int, default=40)
    return p


def convert(args) -> Path:
    from raycap.models.tokenizers import load_tokenizer

    check_output_dir(args.out, "--out")
    if args.kind == "clipcap":
        from raycap.models.clipcap import ClipCap, ClipCapConfig

        if not args.checkpoint.is_file():
            raise UserError(f"{args.checkpoint}: no such checkpoint file")
        tokenizer = load_tokenizer(args.tokenizer)
        config = ClipCapConfig(clip_dim=args.clip_dim, prefix_length=args.prefix_length, mapper=args.mapper,
                               mapper_layers=args.mapper_layers, clip_length=args.clip_length, lm=args.lm,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               max_new_tokens=args.max_new_tokens)
        captioner = ClipCap.from_original_clipcap(args.checkpoint, config)
        vocab = captioner.lm.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise UserError(f"--tokenizer {args.tokenizer}: {len(tokenizer)} tokens but the checkpoint's LM embeds "
                            f"{vocab}")
    else:
        from raycap.models.blip import BlipCaptioner

        tokenizer = load_tokenizer(args.tokenizer or args.model)
        captioner = BlipCaptioner.from_blip(args.model, tokenizer, args.max_new_tokens)
    captioner.save_pretrained(args.out)
    tokenizer.save_pretrained(str(args.out / "tokenizer"))
    return args.out


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        out = convert(args)
    print(f"wrote {out} (use it as captioner.path)")
    return out


if __name__ == "__main__":
    main()
