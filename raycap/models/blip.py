"""BLIP as a raycap captioner, on HF `BlipForConditionalGeneration` and its image processor.

The vision tower is frozen in RL: its features (the ViT's last hidden states, (1 + patches) x width per image)
are computed once per run and read like ClipCap reads the retriever's embeddings (`reads_retriever_embeddings`
is False, so `raycap.inputs.captioner_inputs` computes them); the text decoder, which cross-attends to them, is
what RL trains. Features take (1 + (image_size / patch_size)^2) * width * 4 bytes per image in fp32: 577 x 768 x
4 = 1.7 MiB for BLIP-base at 384 px (a COCO train split of 113K images does not fit in memory, so there the
inputs are each batch's pixel values, `raycap.inputs.ImageRows`, run through the tower wherever the captioner
is), 37 x 64 x 4 = 9.25 KiB for the tiny world BLIP at 48 px. Decoding (greedy, sampled,
beam, with the KV cache) is `raycap.models.decoding`'s, as for ClipCap: each caption starts from BLIP's decoder
start token and ends at its end token (`[SEP]` in BLIP's BERT vocabulary). `logits` and `log_probs` also take
pixel values (N, 3, H, W): the supervised stage of a BLIP trained from scratch runs its vision tower with
gradients.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from raycap.errors import UserError
from raycap.models import lora, precision
from raycap.models.decoding import Decoding, repeat_rows

CONFIG_NAME = "raycap_blip.json"
MODEL_DIR = "blip"


@dataclass
class BlipCaptionerConfig:
    bos_token_id: int              # the decoder's start token (BLIP: [DEC])
    eos_token_id: int              # what ends a caption (BLIP: [SEP])
    pad_token_id: int = 0
    max_new_tokens: int = 40
    train_vision: bool = False     # the supervised stage of a from-scratch BLIP trains its vision tower too
    clip_dim: int | None = None    # not read: BLIP reads its own vision features, not the retriever's


class BlipCaptioner(Decoding, nn.Module):
    reads_retriever_embeddings = False

    def __init__(self, model, processor, config: BlipCaptionerConfig):
        super().__init__()
        self.model, self.processor, self.config = model, processor, config
        self.stop_ids = [config.eos_token_id]
        precision.fp32_head(model.text_decoder)  # log-probs from fp32 logits under bf16 autocast too
        self.set_trainable(True)

    # -- the protocol -----------------------------------------------------------------------------------
    def set_trainable(self, train_lm: bool) -> None:
        """RL trains the text decoder; the vision tower stays frozen (unless `config.train_vision`)."""
        self.model.requires_grad_(False)
        if lora.has_lora(self.model.text_decoder):
            lora.mark_trainable(self.model.text_decoder)
        else:
            self.model.text_decoder.requires_grad_(train_lm)
        if self.config.train_vision:
            self.model.vision_model.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.config.train_vision:
            self.model.vision_model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cached_input_shape(self) -> tuple[int, int]:
        """What a run caches per image (`raycap.inputs`): the vision features, (1 + patches, width)."""
        return feature_shape(self.model.config.vision_config)

    @torch.no_grad()
    def encode_images(self, images) -> Tensor:
        """PIL images -> (N, 1 + patches, width) vision features (fp32, on the CPU), frozen."""
        return self.features(self.pixels(images)).float().cpu()

    def pixels(self, images) -> Tensor:
        """PIL images -> the processor's pixel values (N, 3, S, S)."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def features(self, pixel_values: Tensor) -> Tensor:
        return self.model.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state

    def _start(self, inputs: Tensor) -> Tensor:
        """Vision features (N, P, D), or pixel values (N, 3, H, W) run through the vision tower."""
        if inputs.dim() == 4:
            return self.features(inputs)
        p = next(self.model.text_decoder.parameters())
        return inputs.to(device=p.device, dtype=p.dtype)

    def _decoder(self, feats: Tensor, ids: Tensor, cache=None, use_cache: bool = False):
        mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        return self.model.text_decoder(input_ids=ids, encoder_hidden_states=feats, encoder_attention_mask=mask,
                                       cache=cache, use_cache=use_cache)

    def _with_start(self, tokens: Tensor) -> Tensor:
        start = torch.full((tokens.shape[0], 1), self.config.bos_token_id, dtype=torch.long, device=tokens.device)
        return torch.cat([start, tokens], 1)

    def _step(self, feats: Tensor, tokens: Tensor, past, use_cache: bool):
        """Next-token logits (N, V) after [start; tokens]; with a cache only the last token is fed."""
        ids = self._with_start(tokens.to(feats.device))
        if use_cache and past is not None:
            out = self._decoder(feats, ids[:, -1:], past, True)
        else:
            out = self._decoder(feats, ids, None, use_cache)
        return out.logits[:, -1].float(), (out.cache if use_cache else None)

    def logits(self, inputs: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced next-token logits (N, T, V), fp32; `inputs` may have N/k rows (num_samples layout)."""
        feats = repeat_rows(self._start(inputs), tokens.shape[0])  # pixels through the tower once per image
        ids = self._with_start(tokens.to(feats.device)[:, :-1])
        return self._decoder(feats, ids).logits.float()

    # -- checkpoints ------------------------------------------------------------------------------------
    @property
    def lora_target(self):
        """The module `captioner.lora` adapts: the text decoder."""
        return self.model.text_decoder

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({"kind": "blip", **dataclasses.asdict(self.config)}, indent=2))
        model = lora.merged(self.model) if lora.has_lora(self.model) else self.model  # a plain BLIP on disk
        model.save_pretrained(path / MODEL_DIR)
        self.processor.save_pretrained(str(path / MODEL_DIR))

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "BlipCaptioner":
        path = Path(path)
        d = json.loads((path / CONFIG_NAME).read_text())
        if d.pop("kind", None) != "blip":
            raise UserError(f"{path / CONFIG_NAME}: not a raycap BLIP captioner (kind is not 'blip')")
        fields = {f.name for f in dataclasses.fields(BlipCaptionerConfig)}
        config = BlipCaptionerConfig(**{**{k: v for k, v in d.items() if k in fields}, **overrides})
        model, processor = load_blip(path / MODEL_DIR)
        return cls(model, processor, config)

    @classmethod
    def from_blip(cls, name_or_path: str, tokenizer, max_new_tokens: int = 40, train_vision: bool = False):
        """A BLIP checkpoint (HF name or directory: `BlipForConditionalGeneration` + its image processor) as a
        raycap captioner; start and end tokens from its text config ([DEC] and [SEP] in BLIP's own)."""
        model, processor = load_blip(name_or_path)
        text = model.config.text_config
        eos = text.sep_token_id if text.sep_token_id is not None else tokenizer.eos_token_id
        pad = text.pad_token_id if text.pad_token_id is not None else tokenizer.pad_token_id
        return cls(model, processor, BlipCaptionerConfig(bos_token_id=text.bos_token_id, eos_token_id=eos,
                                                         pad_token_id=pad, max_new_tokens=max_new_tokens,
                                                         train_vision=train_vision))


def feature_shape(vision_config) -> tuple[int, int]:
    """(1 + patches, width): a BLIP vision tower's last hidden states per image, from its config."""
    return 1 + (vision_config.image_size // vision_config.patch_size) ** 2, vision_config.hidden_size


def load_blip(name_or_path):
    """(BlipForConditionalGeneration, BlipImageProcessor) of a name or directory; one line if it cannot load."""
    from transformers import BlipForConditionalGeneration, BlipImageProcessor

    try:
        model = BlipForConditionalGeneration.from_pretrained(str(name_or_path), use_safetensors=True)
        processor = BlipImageProcessor.from_pretrained(str(name_or_path))
    except OSError as e:
        raise UserError(f"BLIP {str(name_or_path)!r}: cannot load it ({str(e).splitlines()[0]}); give a local "
                        "directory of a BlipForConditionalGeneration with its preprocessor_config.json") from None
    return model, processor


def blip_vision_config_of(visual, layers: int | None = None) -> dict:
    """The `BlipVisionConfig` fields of a BLIP vision tower shaped as an open_clip ViT image tower (`visual`),
    with its first `layers` blocks (default all)."""
    from raycap.models.clip_vision import vit_tower_fields

    blocks = visual.transformer.resblocks
    if layers is not None and not 1 <= layers <= len(blocks):
        raise ValueError(f"layers: the tower has {len(blocks)} blocks, not {layers}")
    fields = vit_tower_fields(visual, "BLIP")
    return fields if layers is None else fields | {"num_hidden_layers": layers}


def blip_vision_state_from_open_clip(visual, layers: int | None = None) -> dict[str, Tensor]:
    """A BLIP vision tower's weights (`BlipVisionModel` state-dict keys) from an open_clip ViT image tower: patch
    embedding (no bias in open_clip: zero), class and position embeddings, the first `layers` blocks (fused qkv
    in the same q, k, v order), and open_clip's `ln_post` as the post-layernorm. BLIP's embeddings have no
    pre-layernorm (open_clip's `ln_pre`), so the copy is the tower up to that norm; `distil_blip_vision`
    (raycap.supervised.blip_vision) trains the rest of the way."""
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    n = len(visual.transformer.resblocks) if layers is None else layers
    conv = sd["conv1.weight"]
    out = {"embeddings.class_embedding": sd["class_embedding"].view(1, 1, -1),
           "embeddings.patch_embedding.weight": conv,
           "embeddings.patch_embedding.bias": torch.zeros(conv.shape[0], dtype=conv.dtype),
           "embeddings.position_embedding": sd["positional_embedding"].unsqueeze(0),
           "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"]}
    names = {"ln_1": "layer_norm1", "attn.in_proj_weight": "self_attn.qkv.weight",
             "attn.in_proj_bias": "self_attn.qkv.bias", "attn.out_proj": "self_attn.projection", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(n):
        prefix = f"transformer.resblocks.{i}."
        for key, value in sd.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for src, dst in names.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"encoder.layers.{i}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                raise ValueError(f"open_clip tower weight {key!r} has no BLIP counterpart")
    return out
