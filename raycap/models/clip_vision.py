"""An open_clip ViT image tower as Hugging Face's `CLIPVisionModel` (the vision tower of LLaVA-style VLMs): the same
weights under HF's names, so a VLM can see through the world retriever's eyes. Unlike BLIP's tower, HF's CLIP tower
has the pre-layernorm (`pre_layrnorm`, open_clip's `ln_pre`), so the copy is exact: every hidden state, and the
pooled class token after `post_layernorm` times the retriever's projection is the retriever's image embedding."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def vit_tower_fields(visual, target: str) -> dict:
    """The fields HF's ViT-style vision configs share (CLIP's, BLIP's), read from an open_clip ViT image tower:
    widths, depth, heads, image and patch size, activation (QuickGELU: `quick_gelu`) and layer-norm eps. `target`
    names the config in the error for an activation it has no counterpart of."""
    from open_clip.transformer import QuickGELU

    blocks = visual.transformer.resblocks
    act = blocks[0].mlp.gelu
    if isinstance(act, QuickGELU):  # OpenAI's CLIP towers
        hidden_act = "quick_gelu"
    elif isinstance(act, nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        raise ValueError(f"the tower's activation {type(act).__name__} has no {target} counterpart")
    size = visual.image_size
    patch = visual.patch_size
    return {"hidden_size": visual.transformer.width, "intermediate_size": blocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(blocks), "num_attention_heads": blocks[0].attn.num_heads,
            "image_size": size[0] if isinstance(size, (tuple, list)) else size,
            "patch_size": patch[0] if isinstance(patch, (tuple, list)) else patch,
            "hidden_act": hidden_act, "layer_norm_eps": blocks[0].ln_1.eps}


def clip_vision_config_of(visual) -> dict:
    """The `CLIPVisionConfig` fields of an open_clip ViT image tower (`visual`)."""
    fields = vit_tower_fields(visual, "CLIPVisionConfig")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("only towers pooled by their class token have a CLIPVisionModel counterpart")
    return fields | {"projection_dim": visual.proj.shape[1] if visual.proj is not None else visual.transformer.width}


def clip_vision_state_from_open_clip(visual) -> dict[str, Tensor]:
    """`CLIPVisionModel` state-dict keys from an open_clip ViT image tower: patch, class and
    position embeddings, `ln_pre` as `pre_layrnorm`, each block (open_clip's fused q, k, v split in that order),
    `ln_post` as `post_layernorm`."""
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out = {"embeddings.class_embedding": sd["class_embedding"],
           "embeddings.patch_embedding.weight": sd["conv1.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "pre_layrnorm.weight": sd["ln_pre.weight"], "pre_layrnorm.bias": sd["ln_pre.bias"],
           "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"]}
    names = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(len(visual.transformer.resblocks)):
        prefix = f"transformer.resblocks.{i}."
        for key, value in sd.items():
            if not key.startswith(prefix):
                continue
            rest, dst = key[len(prefix):], f"encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}.{kind}"] = part.clone()
                continue
            for src, name in names.items():
                if rest.startswith(src + "."):
                    out[f"{dst}{name}{rest[len(src):]}"] = value
                    break
            else:
                raise ValueError(f"open_clip tower weight {key!r} has no CLIPVisionModel counterpart")
    return out


def clip_vision_from_open_clip(visual):
    """A `CLIPVisionModel` holding the open_clip tower's weights (exactly: no weight is left random)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**clip_vision_config_of(visual)))
    state = clip_vision_state_from_open_clip(visual)
    if next(iter(model.state_dict())).startswith("vision_model."):  # the names of transformers < 5
        state = {f"vision_model.{k}": v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip tower -> CLIPVisionModel: missing {missing}, unexpected {unexpected}")
    return model
