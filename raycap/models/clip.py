"""The frozen CLIP retriever, a thin layer over open_clip.

`Retriever` gives `encode_image`, `encode_text`, `encode_soft_tokens` (the text tower on token distributions,
through the embedding matrix, for Gumbel-softmax captions) and `logit_scale`. It wraps
- a tiny custom open_clip CLIP for the shapes world, with the world's word-level tokenizer;
- any open_clip model by name + pretrained tag (`ViT-B-32`, `openai`) or local checkpoint file;
- a raycap retriever directory (`raycap_retriever.json` + `model.safetensors` + `tokenizer/`);
- an open_clip model directory (`local-dir:PATH`: open_clip_config.json + weights, a HF tokenizer when it names
  one), such as the world's retriever written by `python -m raycap.data export-world`.
`Retriever.load(name=..., pretrained=..., path=...)` picks the right one.
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
from raycap.models.precision import fp32_linear
from raycap.models.safetensors_io import load_weights
from raycap.models.tokenizers import encode as encode_ids
from raycap.models.tokenizers import load_tokenizer

META_FILE, WEIGHTS_FILE = "raycap_retriever.json", "model.safetensors"
OPEN_CLIP_CONFIG, LOCAL_DIR = "open_clip_config.json", "local-dir:"  # an open_clip model directory


WORLD_TOWERS = {  # world version -> (embed_dim, vision width, text width)
    1: (64, 96, 64),
    2: (128, 128, 96),  # a wider joint space: room for every object's colour+shape of a 3-object scene
}


def world_clip_config(vocab_size: int, image_size: int = 48, context_length: int = 48, version: int = 1) -> dict:
    """open_clip model config of the tiny world retriever of a world version."""
    embed_dim, vision_width, text_width = WORLD_TOWERS[version]
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": vision_width, "layers": 4,
                       "head_width": 32},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": text_width, "heads": 4,
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
    def for_world(cls, tokenizer, image_size: int = 48, context_length: int = 48, version: int = 1) -> "Retriever":
        cfg = world_clip_config(len(tokenizer), image_size, context_length, version)
        return cls(open_clip.CLIP(**cfg), tokenizer, {"source": "config", "model_cfg": cfg})

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | None = None) -> "Retriever":
        """An open_clip model by name; `pretrained` is a tag ('openai') or a local checkpoint file.
        `local-dir:PATH` is an open_clip model directory (see `from_open_clip_dir`)."""
        if name.startswith(LOCAL_DIR):
            if pretrained is not None:
                raise UserError(f"{name}: pretrained={pretrained!r} does not apply to a local-dir: model "
                                "(its weights are in the directory)")
            return cls.from_open_clip_dir(name[len(LOCAL_DIR):])
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except RuntimeError as e:
            raise UserError(f"cannot build open_clip model {name!r} (pretrained={pretrained!r}): {e}") from None
        mean = getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
        meta = {"source": "open_clip", "name": name, "pretrained": pretrained, "mean": list(mean), "std": list(std)}
        return cls(model, OpenClipTokenizer(name), meta)

    @classmethod
    def from_open_clip_dir(cls, path: str | Path) -> "Retriever":
        """An open_clip model directory (`open_clip.create_model("local-dir:PATH")`: open_clip_config.json +
        weights). When its text_cfg names an `hf_tokenizer_name` and the directory holds a `tokenizer.json`, the
        tokenizer is that HF tokenizer, used through raycap's `encode` exactly as in a raycap retriever directory
        (`python -m raycap.data export-world` writes such a directory); otherwise open_clip's tokenizer."""
        path = Path(path)
        name = f"{LOCAL_DIR}{path}"
        cfg = read_open_clip_dir(path)
        try:
            model = open_clip.create_model(name)
        except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:
            raise UserError(f"{path}: cannot build the open_clip model: {_first_line(e)}") from None
        if "hf_tokenizer_name" in cfg["model_cfg"].get("text_cfg", {}) and (path / "tokenizer.json").is_file():
            tok = load_tokenizer(path)
        else:
            try:
                tok = OpenClipTokenizer(name)
            except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:
                raise UserError(f"{path}: cannot load the open_clip tokenizer: {_first_line(e)}") from None
        pp = dict(model.visual.preprocess_cfg)
        meta = {"source": "open_clip", "name": name, "pretrained": None, "mean": list(pp["mean"]),
                "std": list(pp["std"]), "model_cfg": cfg["model_cfg"], "preprocess_cfg": pp}
        return cls(model, tok, meta)

    @classmethod
    def load(cls, name: str | None = None, pretrained: str | None = None, path: str | None = None) -> "Retriever":
        """One entry for every kind of retriever: `path` = a raycap retriever directory (raycap_retriever.json)
        or an open_clip model directory (open_clip_config.json); or `name` = an open_clip model name (or
        `local-dir:PATH`) with an optional `pretrained` tag or local checkpoint file. Mistakes: one-line UserError."""
        if path is not None:
            p = Path(path)
            if name is not None or pretrained is not None:
                raise UserError(f"retriever {p}: give a retriever path or an open_clip name (+ pretrained), not both")
            if not p.exists():
                raise UserError(f"retriever {p}: no such directory")
            if not p.is_dir():
                raise UserError(f"retriever {p}: is a file, not a retriever directory (a checkpoint file goes with "
                                "an open_clip model name, as pretrained)")
            if (p / META_FILE).is_file():
                return cls.from_pretrained(p)
            if (p / OPEN_CLIP_CONFIG).is_file():
                return cls.from_open_clip_dir(p)
            raise UserError(f"retriever {p}: neither a raycap retriever directory (no {META_FILE}) nor an "
                            f"open_clip model directory (no {OPEN_CLIP_CONFIG})")
        if not name:
            raise UserError("retriever: give a path (a raycap retriever or open_clip model directory) or an "
                            "open_clip model name")
        if pretrained is not None and not name.startswith(LOCAL_DIR) and ":" not in name:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags and not Path(pretrained).is_file():
                known = f" (known tags: {', '.join(tags)})" if tags else ""
                raise UserError(f"retriever {name}: pretrained {pretrained}: no such checkpoint file and not a "
                                f"known pretrained tag{known}")
        return cls.from_open_clip(name, pretrained)

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
        elif "model_cfg" in meta:  # from an open_clip model directory: self-contained, the directory not needed
            model = _clip_from_cfg(meta["model_cfg"])
            if meta.get("preprocess_cfg"):
                open_clip.set_model_preprocess_cfg(model, meta["preprocess_cfg"])
            tok = load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() \
                else OpenClipTokenizer(meta["name"], meta["model_cfg"])
        else:
            model, tok = open_clip.create_model(meta["name"], pretrained=None), OpenClipTokenizer(meta["name"])
        model.load_state_dict(load_weights(path / WEIGHTS_FILE))
        return cls(model, tok, meta)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(path / WEIGHTS_FILE))
        if not isinstance(self.tokenizer, OpenClipTokenizer):  # a HF tokenizer (the world's): saved alongside
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

    def preprocess(self):
        """The evaluation transform for PIL images (open_clip's: resize the short side, centre crop, normalise)
        with this model's input size, mean and std. On uint8 images already at the input size it equals
        `pixels` exactly (the world's PNG files give the in-memory world's embeddings)."""
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        return open_clip.image_transform(self.image_size, is_train=False, mean=tuple(self.pixel_mean.flatten().tolist()),
                                         std=tuple(self.pixel_std.flatten().tolist()),
                                         resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))

    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S) at the model's input size."""
        x = torch.as_tensor(np.asarray(images)).to(self.pixel_mean.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode_pixels(self, images: np.ndarray, chunk: int = 512) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> (N, D) normalised embeddings on the CPU (a cache, whatever the model's
        device), encoded `chunk` at a time on the model's device, without gradients."""
        return torch.cat([self.encode_image(self.pixels(images[k:k + chunk])).float().cpu()
                          for k in range(0, len(images), chunk)])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> embeddings (B, D)."""
        return self.model.encode_image(images, normalize=normalize)

    @property
    def token_shape(self) -> tuple[int, int]:
        """(tokens, width) of `encode_image_tokens`: the class token and one per patch, at the tower's width."""
        visual = self.model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if not hasattr(visual, "_embeds") or not hasattr(visual, "grid_size") or not blocks or len(blocks) < 2:
            raise UserError(f"retriever {self.meta.get('name', 'world')}: its image tower ({type(visual).__name__}) "
                            "gives no patch tokens; a captioner reading image tokens needs a ViT tower")
        return visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> (B, tokens, width): the class token and the patch tokens as they
        enter the tower's last block. The last block's own patch outputs feed nothing the contrastive loss saw
        (only its class token is pooled), so the penultimate layer's are the ones trained to carry what the
        embedding is made of (LLaVA reads CLIP there too); they keep where each thing is."""
        self.token_shape  # a ViT tower, or one line
        visual = self.model.visual
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        return x

    @torch.no_grad()
    def encode_pixels_tokens(self, images: np.ndarray, chunk: int = 512) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> (N, tokens, width) patch tokens on the CPU, `chunk` at a time on the
        model's device, without gradients."""
        return torch.cat([self.encode_image_tokens(self.pixels(images[k:k + chunk])).float().cpu()
                          for k in range(0, len(images), chunk)])

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

    def encode_soft_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Input embeddings (B, L, width) already in the text tower's token space (`raycap.models.vocab.TokenMap`
        builds them from another vocabulary's soft tokens) -> embeddings (B, D), pooled at `eot_index`."""
        return self._text_tower(x, eot_index, normalize)

    def _text_tower(self, x: torch.Tensor, eot_index: torch.Tensor, normalize: bool) -> torch.Tensor:
        m, length = self.model, x.shape[1]
        if length > self.context_length:
            raise ValueError(f"text of {length} tokens exceeds the retriever's context of {self.context_length}")
        x = x + m.positional_embedding[:length].to(x.dtype)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
        proj = m.text_projection  # the embedding that becomes a logit: fp32
        x = fp32_linear(x, proj.weight, proj.bias) if isinstance(proj, nn.Linear) else fp32_linear(x, proj.T)
        return F.normalize(x, dim=-1) if normalize else x


class OpenClipTokenizer:
    """open_clip's own tokenizer, trimmed to the batch's longest caption."""

    def __init__(self, name: str, model_cfg: dict | None = None):
        """`model_cfg` (an open_clip model config) builds open_clip's default tokenizer without looking `name` up
        (a saved local-dir: retriever whose directory is gone)."""
        if model_cfg is not None:
            text_cfg = model_cfg.get("text_cfg", {})
            tok = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                                            **text_cfg.get("tokenizer_kwargs", {}))
        else:
            tok = open_clip.get_tokenizer(name)
        self.name, self._tok = name, tok

    def tokenize(self, captions: Sequence[str], context_length: int) -> torch.Tensor:
        ids = self._tok(list(captions), context_length=context_length)
        width = int((ids != 0).sum(dim=1).max())
        return ids[:, :max(width, 1)]

    def __len__(self) -> int:
        return self._tok.vocab_size


def read_open_clip_dir(path: str | Path) -> dict:
    """The open_clip_config.json of an open_clip model directory, checked: one-line UserError naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such open_clip model directory")
    cfg_file = path / OPEN_CLIP_CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{path} is not an open_clip model directory: missing {OPEN_CLIP_CONFIG}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_file}: cannot read: {_first_line(e)}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise UserError(f"{cfg_file}: no model_cfg mapping (an open_clip model directory's config has one)")
    if not any(any(path.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
        raise UserError(f"{path}: no weights file (open_clip_model.safetensors); open_clip would build the model "
                        "with random weights")
    return cfg


def _clip_from_cfg(model_cfg: dict) -> nn.Module:
    """The model open_clip.create_model builds from a model config (fp32), without weights."""
    import copy

    cfg = copy.deepcopy(model_cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
