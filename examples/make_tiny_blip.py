"""Build a tiny BLIP (BlipForConditionalGeneration) over a world's word vocabulary, saved as an ordinary HF
directory with its image processor and tokenizer: what `Salesforce/blip-image-captioning-base` looks like to
raycap, made offline at world size (48 px images, 8 px patches). Its vision tower is random (width 64), or with
`--vision-from RETRIEVER_DIR` the world retriever's image tower, copied into BLIP's and distilled on the world's
unlabelled training images (`raycap.supervised.blip_vision`: BLIP has no pre-layernorm), as the paper's BLIP
starts from a pretrained ViT; the text decoder is random either way.

    python examples/make_tiny_blip.py --out runs/blip-world/blip
    python -m raycap.pretrain captioner --config examples/blip-world.yaml --out runs/blip-world
    python -m raycap.train --config world-demo --set captioner.path=runs/blip-world/captioner --out runs/blip-rl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

from raycap.config import ASSETS_DIR, WORLD_DIR
from raycap.models.tokenizers import load_tokenizer

START = "[DEC]"  # BLIP's decoder start token


def tiny_blip(tokenizer, image_size: int = 48, width: int = 64, layers: int = 2,
              vision: dict | None = None) -> BlipForConditionalGeneration:
    """A random BLIP: a text decoder of `layers` x `width`; the vision tower the same size, or `vision`'s config."""
    if vision is None:
        vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "image_size": image_size, "patch_size": 8}
    text = {"vocab_size": len(tokenizer), "hidden_size": width, "encoder_hidden_size": vision["hidden_size"],
            "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 4,
            "max_position_embeddings": 64, "bos_token_id": tokenizer.convert_tokens_to_ids(START),
            "sep_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
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


def save_blip_on_retriever(out: Path, retriever_dir: Path, world_dir: Path, seed: int = 0, steps: int = 1000,
                           images: int = 10000) -> dict:
    """A tiny BLIP whose vision tower is the retriever's image tower (copied, then distilled on the first `images`
    training images of the world in `world_dir`; 500 validation images measure it), its processor normalising as
    the retriever does; the tokenizer is the retriever's. Returns the distillation's metrics."""
    import json

    from raycap.data.world import World, WorldConfig
    from raycap.models.blip import blip_vision_config_of
    from raycap.models.clip import Retriever
    from raycap.supervised.blip_vision import blip_vision_from_retriever

    retriever = Retriever.from_pretrained(retriever_dir).eval()
    world = World(WorldConfig.parse(json.loads((world_dir / "world.json").read_text()), str(world_dir)))
    n = min(images, world.config.n_train)
    vision, metrics = blip_vision_from_retriever(retriever, world.images("train", range(n)),
                                                 world.images("val", range(min(500, world.config.n_val))),
                                                 steps=steps, seed=seed)
    tok = load_tokenizer(retriever_dir / "tokenizer")
    tok.add_special_tokens({"bos_token": START})
    torch.manual_seed(seed)
    model = tiny_blip(tok, retriever.image_size, vision=blip_vision_config_of(retriever.model.visual))
    model.vision_model.load_state_dict(vision.state_dict())
    model.save_pretrained(out)
    size = retriever.image_size
    BlipImageProcessor(size={"height": size, "width": size}, image_mean=retriever.pixel_mean.flatten().tolist(),
                       image_std=retriever.pixel_std.flatten().tolist()).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    metrics |= {"retriever": str(retriever_dir), "seed": seed}
    (out / "vision_distillation.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=ASSETS_DIR / "world" / "retriever" / "tokenizer",
                   help="the word vocabulary (default: the shipped world's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-from", type=Path, default=None, metavar="RETRIEVER_DIR",
                   help="the vision tower from this world retriever's image tower (its tokenizer too)")
    p.add_argument("--world", type=Path, default=WORLD_DIR, help="--vision-from: the world whose unlabelled "
                   "training images the copied tower is distilled on (default: the shipped world)")
    p.add_argument("--distil-steps", type=int, default=1000)
    p.add_argument("--distil-images", type=int, default=10000)
    args = p.parse_args(argv)
    if args.vision_from is not None:
        metrics = save_blip_on_retriever(args.out, args.vision_from, args.world, args.seed, args.distil_steps,
                                         args.distil_images)
        print("vision tower (validation images):", metrics)
    else:
        save_tiny_blip(args.out, args.tokenizer, args.seed)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
