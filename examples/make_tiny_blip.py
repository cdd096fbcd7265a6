"""Build a tiny BLIP (random init, BlipForConditionalGeneration) over a world's word vocabulary, saved as an
ordinary HF directory with its image processor and tokenizer: what `Salesforce/blip-image-captioning-base`
looks like to raycap, made offline at world size (48 px images, 8 px patches, width 64).

    python examples/make_tiny_blip.py --out runs/blip-world/blip
    python -m raycap.pretrain captioner --config examples/blip-world.yaml --out runs/blip-world
    python -m raycap.train --config world-demo --set captioner.path=runs/blip-world/captioner --out runs/blip-rl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

from raycap.config import ASSETS_DIR
from raycap.models.tokenizers import load_tokenizer

START = "[DEC]"  # BLIP's decoder start token


def tiny_blip(tokenizer, image_size: int = 48, width: int = 64, layers: int = 2) -> BlipForConditionalGeneration:
    text = {"vocab_size": len(tokenizer), "hidden_size": width, "encoder_hidden_size": width,
            "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 4,
            "max_position_embeddings": 64, "bos_token_id": tokenizer.convert_tokens_to_ids(START),
            "sep_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
              "num_attention_heads": 4, "image_size": image_size, "patch_size": 8}
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))


def save_tiny_blip(out: Path, tokenizer_dir: Path, seed: int = 0, image_size: int = 48) -> Path:
    tok = load_tokenizer(tokenizer_dir)
    tok.add_special_tokens({"bos_token": START})
    torch.manual_seed(seed)
    model = tiny_blip(tok, image_size)
    model.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=ASSETS_DIR / "world" / "retriever" / "tokenizer",
                   help="the word vocabulary (default: the shipped world's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    save_tiny_blip(args.out, args.tokenizer, args.seed)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
