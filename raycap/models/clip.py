"""The frozen CLIP retriever, a thin layer over open_clip.

`Retriever` gives `encode_image`, `encode_text`, `encode_soft_tokens` (the text tower on token distributions,
through the embedding matrix, for Gumbel-softmax captions) and `logit_scale`. It wraps
- a tiny custom open_clip CLIP for the shapes world, with the world's word-level tokenizer;
- any open_clip model by name + pretrained tag (`ViT-B-32`, `openai`) or local checkpoint file;
- a raycap retriever directory (`raycap_retriever.json` + `model.safetensors` + `tokenizer/`).
Text runs at the batch's own length (causal mask + end-of-text pooling make this exact), not the full context.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file
from torch import nn

from raycap.errors import UserError
from raycap.models.safetensors_io import load_weights
from raycap.models.tokenizers import encode as encode_ids
from raycap.models.tokenizers import load_tokenizer

META_FILE, WEIGHTS_FILE = "raycap_retriever.json", "model.safetensors"


def world_clip_config(vocab_size: int, image_size: int = 48, context_length: int = 48) -> dict:
    """open_clip model config of the tiny world retriever."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": 64, "heads": 4,
                     "layers": 3},
    }


class Retriever(nn.Module):
    """A CLIP model plus its tokenizer. `freeze()` makes it the fixed judge the RL stage needs."""

    def __init__(self, model: open_clip.CLIP, tokenizer, meta: dict):
        super().__init__()
        if not hasattr(model, "token_embedding"):
            raise UserError(f"retriever {meta.get('name', '?')}: only open_clip models with a built-in text "
                            "tower are supported (encode_soft_tokens needs its token embedding)")
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.register_buffer("pixel_mean", torch.tensor(meta.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(meta.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def for_world(cls, tokenizer, image_size: int = 48, context_length: int = 48) -> "Retriever":
        cfg = world_clip_config(len(tokenizer), image_size, context_length)
        return cls(open_clip.CLIP(**cfg), tokenizer, {"source": "config", "model_cfg": cfg})

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | None = None) -> "Retriever":
        """An open_clip model by name; `pretrained` is a tag ('openai') or a local checkpoint file."""
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except RuntimeError as e:
            raise UserError(f"cannot build open_clip model {name!r} (pretrained={pretrained!r}): {e}") from None
        mean = getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
        meta = {"source": "open_clip", "name": name, "pretrained": pretrained, "mean": list(mean), "std": list(std)}
        return cls(model, OpenClipTokenizer(name), meta)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Retriever":
        """Load a directory written by `save_pretrained`."""
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise UserError(f"{path} is not a raycap retriever checkpoint: missing {META_FILE}")
        meta = json.loads(meta_file.read_text())
        if meta.get("kind") != "retriever":
            raise UserError(f"{meta_file}: kind is {meta.get('kind')!r}, expected 'retriever'")
        if not (path / WEIGHTS_FILE).is_file():
            raise UserError(f"{path} is not a complete retriever checkpoint: missing {WEIGHTS_FILE}")
        if meta["source"] == "config":
            if not (path / "tokenizer").is_dir():
                raise UserError(f"{path} is not a complete retriever checkpoint: missing tokenizer/")
            model, tok = open_clip.CLIP(**meta["model_cfg"]), load_tokenizer(path / "tokenizer")
        else:
            model, tok = open_clip.create_model(meta["name"], pretrained=None), OpenClipTokenizer(meta["name"])
        model.load_state_dict(load_weights(path / WEIGHTS_FILE))
        return cls(model, tok, meta)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(path / WEIGHTS_FILE))
        if self.meta["source"] == "config":
            self.tokenizer.save_pretrained(str(path / "tokenizer"))
        (path / META_FILE).write_text(json.dumps({"kind": "retriever", **self.meta}, indent=2))

    def freeze(self) -> "Retriever":
        self.requires_grad_(False)
        return self.eval()

    # -- encoders -----------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def embed_dim(self) -> int:
        return self.model.visual.output_dim

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S) at the model's input size."""
        x = torch.as_tensor(np.asarray(images)).to(self.pixel_mean.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode_pixels(self, images: np.ndarray, chunk: int = 512) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> (N, D) normalised embeddings, in chunks, without gradients."""
        return torch.cat([self.encode_image(self.pixels(images[k:k + chunk])) for k in range(0, len(images), chunk)])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> embeddings (B, D)."""
        return self.model.encode_image(images, normalize=normalize)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids ending in end-of-text, padded to the batch's longest caption (at most the context)."""
        return self.tokenizer.tokenize(captions, self.context_length) if isinstance(self.tokenizer, OpenClipTokenizer) \
            else encode_ids(self.tokenizer, captions, self.context_length)[0]

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids (B, L<=context) -> embeddings (B, D); pooled at the end-of-text token (the highest id)."""
        tokens = tokens.to(self.pixel_mean.device)
        return self._text_tower(self.model.token_embedding(tokens), tokens.argmax(dim=-1), normalize)

    def encode_captions(self, captions: Sequence[str], normalize: bool = True, chunk: int = 256) -> torch.Tensor:
        """Captions -> embeddings. Sorted by length and run in chunks, each at its own longest length
        (exact: causal attention never looks at the padding), which saves the padding's compute."""
        ids = self.tokenize(captions)
        order = (ids != 0).sum(dim=1).argsort()
        parts = []
        for k in range(0, len(order), chunk):
            rows = ids[order[k:k + chunk]]
            parts.append(self.encode_text(rows[:, : int((rows != 0).sum(dim=1).max())], normalize))
        out = torch.cat(parts)
        return out[order.argsort()]

    def encode_soft_tokens(self, probs: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token distributions (B, L, V) -> embeddings (B, D), differentiable in `probs`.
        Position `eot_index[b]` must hold (a distribution on) the end-of-text token."""
        x = probs.to(self.model.token_embedding.weight.dtype) @ self.model.token_embedding.weight
        return self._text_tower(x, eot_index, normalize)

    def _text_tower(self, x: torch.Tensor, eot_index: torch.Tensor, normalize: bool) -> torch.Tensor:
        m, length = self.model, x.shape[1]
        if length > self.context_length:
            raise ValueError(f"text of {length} tokens exceeds the retriever's context of {self.context_length}")
        x = x + m.positional_embedding[:length].to(x.dtype)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1) if normalize else x


class OpenClipTokenizer:
    """open_clip's own tokenizer, trimmed to the batch's longest caption."""

    def __init__(self, name: str):
        self.name, self._tok = name, open_clip.get_tokenizer(name)

    def tokenize(self, captions: Sequence[str], context_length: int) -> torch.Tensor:
        ids = self._tok(list(captions), context_length=context_length)
        width = int((ids != 0).sum(dim=1).max())
        return ids[:, :max(width, 1)]

    def __len__(self) -> int:
        return self._tok.vocab_size
