"""Build a tiny LLaVA (LlavaForConditionalGeneration) whose vision tower is a world retriever's image tower, saved as
an ordinary HF directory with its processor: what a LLaVA-style VLM looks like to raycap, made offline at world size.

The tower is the retriever's, copied exactly into HF's `CLIPVisionModel` (`raycap.models.clip_vision`: HF's CLIP
tower has open_clip's pre-layernorm, so nothing needs distilling, unlike BLIP's); the image processor normalises as
the retriever does (the world's images are already at the tower's size: no resize, no crop). LLaVA reads the
tower's penultimate hidden states, class token included, as `Retriever.encode_image_tokens` does. The projector
(LLaVA's two-layer MLP) and the language model (a Llama of the world captioner's size, over the retriever's word
vocabulary plus `<image>`) are random: the supervised stage (`model.kind: vlm`) trains them.

    python examples/make_tiny_llava.py --out runs/llava-world/llava
    python -m raycap.pretrain captioner --config examples/llava-world.yaml --out runs/llava-world/sup
    python -m raycap.train --config world-demo --set captioner.path=runs/llava-world/sup/captioner --out runs/llava-rl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from raycap.config import WORLD_DIR
from raycap.models.tokenizers import load_tokenizer

IMAGE_TOKEN = "<image>"


def llava_on_retriever(retriever, tokenizer, width: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor): the retriever's image tower (exact copy), a random projector
    and a random Llama of `layers` x `width` over `tokenizer` (which gains the `<image>` token)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from raycap.models.clip_vision import clip_vision_config_of, clip_vision_from_open_clip

    visual = retriever.model.visual
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    size = retriever.image_size
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, size={"shortest_edge": size},
                                crop_size={"height": size, "width": size},
                                image_mean=retriever.pixel_mean.flatten().tolist(),
                                image_std=retriever.pixel_std.flatten().tolist())
    vision = clip_vision_config_of(visual)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision["patch_size"],
                               vision_feature_select_strategy="full", num_additional_image_tokens=1)
    text = LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                       vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip_vision_from_open_clip(visual).state_dict())
    return model, processor


def save_llava_on_retriever(out: Path, retriever_dir: Path, seed: int = 0, width: int = 128, layers: int = 4) -> Path:
    from raycap.models.clip import Retriever

    retriever = Retriever.from_pretrained(retriever_dir).eval()
    model, processor = llava_on_retriever(retriever, load_tokenizer(retriever_dir / "tokenizer"), width, layers,
                                          seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(str(out))
    (out / "raycap_source.json").write_text(json.dumps({"retriever": str(retriever_dir), "seed": seed,
                                                        "width": width, "layers": layers}, indent=2))
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vision-from", type=Path, default=WORLD_DIR / "retriever", metavar="RETRIEVER_DIR",
                   help="the world retriever whose image tower and word vocabulary the LLaVA takes (default: the "
                   "shipped world's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128, help="the language model's width")
    p.add_argument("--layers", type=int, default=4, help="the language model's layers")
    args = p.parse_args(argv)
    save_llava_on_retriever(args.out, args.vision_from, args.seed, args.width, args.layers)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
