"""ClipCap: CLIP image embedding (or the image tower's patch tokens) -> mapping network -> prefix embeddings
-> causal LM.

A compact re-implementation of ClipCap (Mokady et al., 2021) on top of any HF
`AutoModelForCausalLM`, with batched greedy / sampling / beam-search decoding
(with or without the KV cache) and teacher-forced log-probs. Token ids in,
token ids out: the tokenizer lives elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from raycap.errors import UserError
from raycap.models import lora, precision
from raycap.models.safetensors_io import load_weights, reading_weights
from raycap.models.decoding import Decoding, cached_forward, keeps_logits, repeat_rows, soft_embeddings

CONFIG_NAME = "raycap_clipcap.json"
MAPPER_NAME = "mapper.safetensors"
LM_DIR = "lm"


@dataclass
class ClipCapConfig:
    """Hyper-parameters of a ClipCap model (serialised to `raycap_clipcap.json`)."""

    clip_dim: int  # the embedding's width, or with image_input "tokens" the tower's token width
    prefix_length: int = 10
    mapper: str = "mlp"  # "mlp" | "transformer"
    mapper_layers: int = 8  # transformer mapper only
    clip_length: int = 10  # transformer mapper only; with image_input "tokens": the number of image tokens
    image_input: str = "embedding"  # "embedding" (the retriever's pooled one) | "tokens" (its patch tokens)
    lm: str | dict = "gpt2"  # HF name / local path, or a dict of GPT2Config kwargs (fresh LM)
    train_lm: bool = True
    eos_token_id: int | None = None  # default: the LM config's eos_token_id
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end a caption
    pad_token_id: int = 0
    max_new_tokens: int = 40


# -----------------------------------------------------------------------------
# mapping networks


class MLPMapper(nn.Module):
    """Original ClipCap MLP: Linear -> Tanh -> Linear, reshaped to (B, prefix_length, hidden)."""

    def __init__(self, clip_dim: int, hidden: int, prefix_length: int):
        super().__init__()
        self.prefix_length, self.hidden = prefix_length, hidden
        n = hidden * prefix_length
        self.model = nn.Sequential(nn.Linear(clip_dim, n // 2), nn.Tanh(), nn.Linear(n // 2, n))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).view(x.size(0), self.prefix_length, self.hidden)


class TransformerMapper(nn.Module):
    """Original ClipCap TransformerMapper (pre-norm, 8 heads, ReLU MLP of width 2*hidden, no dropout)."""

    def __init__(self, clip_dim: int, hidden: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length, self.hidden = clip_length, hidden
        self.linear = nn.Linear(clip_dim, clip_length * hidden)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, 8, 2 * hidden, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x).view(x.size(0), self.clip_length, self.hidden)
        x = torch.cat([x, self.prefix_const.expand(x.size(0), -1, -1)], dim=1)
        return self.transformer(x)[:, self.clip_length:]


class TokenMapper(nn.Module):
    """A Transformer mapper over the image tower's tokens instead of one embedding: each token is normalised, projected
    to the LM width and given a learned position, the prefix constants attend to all of them (the ClipCap
    Transformer mapper's layers), and their outputs are the prefix."""

    def __init__(self, token_dim: int, hidden: int, prefix_length: int, num_tokens: int, num_layers: int):
        super().__init__()
        self.num_tokens, self.hidden = num_tokens, hidden
        self.norm = nn.LayerNorm(token_dim)  # a tower's inner tokens are not normalised
        self.linear = nn.Linear(token_dim, hidden)
        self.position = nn.Parameter(torch.randn(num_tokens, hidden) * 0.02)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, 8, 2 * hidden, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_tokens, self.linear.in_features):
            raise ValueError(f"the token mapper reads (B, {self.num_tokens}, {self.linear.in_features}) image "
                             f"tokens, got {tuple(tokens.shape)}")
        x = self.linear(self.norm(tokens)) + self.position
        x = torch.cat([x, self.prefix_const.expand(x.size(0), -1, -1)], dim=1)
        return self.transformer(x)[:, self.num_tokens:]


def _convert_original_transformer_mapper(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map original ClipCap Transformer keys (`layers.i.attn.to_queries` ...) onto nn.TransformerEncoder keys."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", k)
        if m is None:
            out[k] = v
            continue
        p, rest = f"transformer.layers.{m[1]}.", m[2]
        if rest in ("attn.to_queries.weight", "attn.to_keys_values.weight"):
            q, kv = sd[p + "attn.to_queries.weight"], sd[p + "attn.to_keys_values.weight"]
            out[p + "self_attn.in_proj_weight"] = torch.cat([q, kv])
            qb, kvb = sd.get(p + "attn.to_queries.bias"), sd.get(p + "attn.to_keys_values.bias")
            qb = torch.zeros(q.size(0), dtype=q.dtype) if qb is None else qb
            kvb = torch.zeros(kv.size(0), dtype=kv.dtype) if kvb is None else kvb
            out[p + "self_attn.in_proj_bias"] = torch.cat([qb, kvb])
        elif rest in ("attn.to_queries.bias", "attn.to_keys_values.bias"):
            pass  # folded into in_proj_bias above
        else:
            rest = rest.replace("attn.project.", "self_attn.out_proj.").replace("mlp.fc1.", "linear1.")
            out[p + rest.replace("mlp.fc2.", "linear2.")] = v
    return out


# -----------------------------------------------------------------------------
# helpers


GPT2_SMALL_NAMES = ("gpt2", "openai-community/gpt2")  # GPT2Config()'s defaults are exactly this model's


def _build_lm(spec: str | dict, weights: bool = True) -> PreTrainedModel:
    """LM from a HF name/local path (pretrained weights, or config only) or a dict of GPT2Config kwargs. With
    `weights=False` (the weights come from elsewhere, e.g. an original ClipCap checkpoint) GPT-2 124M needs no
    download: its architecture is GPT2Config()'s defaults."""
    if isinstance(spec, dict):
        return GPT2LMHeadModel(GPT2Config(**spec))
    try:
        if weights:
            return AutoModelForCausalLM.from_pretrained(spec)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec))
    except OSError as e:
        if not weights and spec in GPT2_SMALL_NAMES:
            return GPT2LMHeadModel(GPT2Config())
        raise UserError(f"lm {spec!r}: cannot load it ({str(e).splitlines()[0]}); give a local directory of an "
                        "HF causal LM, or download it first (huggingface-cli download NAME) on a machine online") from None


# -----------------------------------------------------------------------------
# model


class ClipCap(Decoding, nn.Module):
    """ClipCap captioner: `prefix()` maps CLIP embeddings to LM input embeddings; `generate()` decodes."""

    def __init__(self, config: ClipCapConfig, lm: PreTrainedModel | None = None):
        super().__init__()
        self.config = config
        self.lm = _build_lm(config.lm) if lm is None else lm
        precision.fp32_head(self.lm)  # log-probs from fp32 logits under bf16 autocast too
        self.hidden = self.lm.get_input_embeddings().embedding_dim
        if config.image_input not in ("embedding", "tokens"):
            raise ValueError(f"unknown image_input {config.image_input!r} (expected 'embedding' or 'tokens')")
        if config.image_input == "tokens":
            if config.mapper != "transformer":
                raise ValueError("image_input 'tokens' needs mapper 'transformer' (an MLP reads one embedding)")
            self.mapper = TokenMapper(config.clip_dim, self.hidden, config.prefix_length, config.clip_length,
                                      config.mapper_layers)
        elif config.mapper == "mlp":
            self.mapper = MLPMapper(config.clip_dim, self.hidden, config.prefix_length)
        elif config.mapper == "transformer":
            self.mapper = TransformerMapper(config.clip_dim, self.hidden, config.prefix_length,
                                            config.clip_length, config.mapper_layers)
        else:
            raise ValueError(f"unknown mapper {config.mapper!r} (expected 'mlp' or 'transformer')")
        eos = config.eos_token_id if config.eos_token_id is not None else self.lm.config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop_ids = sorted(set(eos) | set(config.stop_token_ids))
        if not config.train_lm:
            self.lm.requires_grad_(False)
            self.lm.eval()

    def train(self, mode: bool = True):
        """As nn.Module.train, but a frozen LM stays in eval mode (no dropout), as in original ClipCap."""
        super().train(mode)
        if not self.config.train_lm:
            self.lm.eval()
        return self

    def set_trainable(self, train_lm: bool) -> None:
        """What RL updates: the mapper, and the LM when `train_lm` and the checkpoint does not freeze it. Every
        copy of a policy (learner, rollout workers, evaluation) marks the same set, which weight movement uses.
        An LM with LoRA adapters (`raycap.models.lora`) trains its adapters only."""
        self.mapper.requires_grad_(True)
        if lora.has_lora(self.lm):
            lora.mark_trainable(self.lm)
        else:
            self.lm.requires_grad_(train_lm and self.config.train_lm)

    @property
    def lora_target(self) -> nn.Module:
        """The module `captioner.lora` adapts: the LM."""
        return self.lm

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    @property
    def reads_image_tokens(self) -> bool:
        """True: it reads the retriever's patch tokens (`raycap.inputs.captioner_inputs` computes them)."""
        return self.config.image_input == "tokens"

    def prefix(self, image_embeds: Tensor) -> Tensor:
        """(B, clip_dim) CLIP embeddings, or (B, tokens, width) patch tokens -> (B, prefix_length, hidden) LM
        input embeddings."""
        p = next(self.mapper.parameters())
        return self.mapper(image_embeds.to(device=p.device, dtype=p.dtype))

    # -- soft tokens (Gumbel-softmax decoding, `raycap.rl.gumbel`) ---------------------------------------------
    soft_decoding = True

    def soft_start(self, image_embeds: Tensor):
        """(the first token's logits (N, V) fp32, the KV cache) after the prefix, with gradients."""
        out, past = cached_forward(self.lm, None, inputs_embeds=self.prefix(image_embeds))
        return out.logits[:, -1].float(), past

    def soft_step(self, probs: Tensor, past):
        """(the next logits, the cache) after feeding soft tokens (N, V) as their input embeddings."""
        out, past = cached_forward(self.lm, past, inputs_embeds=soft_embeddings(self.lm.get_input_embeddings(), probs))
        return out.logits[:, -1].float(), past

    def _start(self, image_embeds: Tensor) -> Tensor:
        """The decoding state of a batch: its prefix embeddings (`raycap.models.decoding`)."""
        return self.prefix(image_embeds)

    def _embed(self, prefix: Tensor, tokens: Tensor) -> Tensor:
        emb = self.lm.get_input_embeddings()(tokens)
        return torch.cat([prefix.to(emb.dtype), emb], dim=1)

    def _step(self, prefix: Tensor, tokens: Tensor, past, use_cache: bool):
        """Next-token logits (N, V) after [prefix; tokens]; with a cache only the last token is fed."""
        if use_cache and past is not None:
            # every position is attended (finished rows keep decoding pads that are masked out later): the mask
            # of ones changes nothing but tells transformers so, instead of its "pass an attention_mask" warning
            mask = torch.ones(tokens.size(0), prefix.size(1) + tokens.size(1), dtype=torch.long, device=tokens.device)
            out, past = cached_forward(self.lm, past, input_ids=tokens[:, -1:], attention_mask=mask)
        elif use_cache:
            out, past = cached_forward(self.lm, None, inputs_embeds=self._embed(prefix, tokens))
        else:
            out, past = self.lm(inputs_embeds=self._embed(prefix, tokens), use_cache=False), None
        return out.logits[:, -1].float(), past

    # -------------------------------------------------------------------------
    # scoring

    def logits(self, image_embeds: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced next-token logits (N, T, V), fp32: row t predicts tokens[:, t] from the prefix and
        tokens[:, :t]. image_embeds may have N/k rows (repeat_interleaved k times, the num_samples layout)."""
        prefix = self.prefix(repeat_rows(image_embeds, tokens.shape[0]))
        tokens = tokens.to(prefix.device)
        P, T = prefix.size(1), tokens.size(1)
        embeds = self._embed(prefix, tokens[:, :-1])
        if keeps_logits(type(self.lm)):  # the LM head only at the T positions read (not over the prefix)
            return self.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=T).logits.float()
        return self.lm(inputs_embeds=embeds, use_cache=False).logits[:, P - 1:].float()

    # -------------------------------------------------------------------------
    # checkpoints

    def save_pretrained(self, path) -> None:
        """Write `raycap_clipcap.json`, `mapper.safetensors` and the LM (`lm/`, safetensors) under `path`; LoRA
        adapters are merged into the saved LM, so the directory is a plain ClipCap."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({"kind": "clipcap", **dataclasses.asdict(self.config)}, indent=2))
        mapper_sd = {k: v.detach().contiguous().cpu() for k, v in self.mapper.state_dict().items()}
        save_file(mapper_sd, str(path / MAPPER_NAME))
        lm = lora.merged(self.lm) if lora.has_lora(self.lm) else self.lm
        lm.save_pretrained(path / LM_DIR)  # safetensors by default

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "ClipCap":
        """Load a `save_pretrained` directory; `overrides` replace config fields (e.g. max_new_tokens)."""
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise UserError(f"{path} is not a raycap ClipCap checkpoint: missing {CONFIG_NAME}")
        d = json.loads(cfg_file.read_text())
        kind = d.pop("kind", None)
        if kind != "clipcap":
            raise UserError(f"{path} is not a raycap ClipCap checkpoint: "
                             f"{CONFIG_NAME} has kind {kind!r}, not 'clipcap'")
        if not (path / MAPPER_NAME).is_file():
            raise UserError(f"{path} is not a raycap ClipCap checkpoint: missing {MAPPER_NAME}")
        lm_dir = path / LM_DIR
        if not (lm_dir / "config.json").is_file():
            raise UserError(f"{path} is not a raycap ClipCap checkpoint: missing {LM_DIR}/config.json")
        if not any(lm_dir.glob("*.safetensors")):  # raycap writes safetensors; a pickled *.bin could run code
            pickled = ": pickled *.bin weights are not loaded" if any(lm_dir.glob("*.bin")) else ""
            raise UserError(f"{path} is not a raycap ClipCap checkpoint: missing LM weights in {LM_DIR}/ "
                            f"(*.safetensors){pickled}")
        fields = {f.name for f in dataclasses.fields(ClipCapConfig)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown ClipCapConfig fields in overrides: {bad}")
        config = ClipCapConfig(**{**{k: v for k, v in d.items() if k in fields}, **overrides})
        lm_files = sorted(lm_dir.glob("*.safetensors"))
        with reading_weights(lm_files[0] if len(lm_files) == 1 else lm_dir):
            lm = AutoModelForCausalLM.from_pretrained(lm_dir, use_safetensors=True)
        model = cls(config, lm=lm)
        model.mapper.load_state_dict(load_weights(path / MAPPER_NAME))
        return model

    @classmethod
    def from_original_clipcap(cls, pt_path, config: ClipCapConfig) -> "ClipCap":
        """Load a checkpoint of the original ClipCap repo (rmokady/CLIP_prefix_caption, `model.state_dict()`).

        Keys: `clip_project.model.{0,2}.*` (MLP mapper) or `clip_project.{linear.*, prefix_const,
        transformer.layers.i.{norm1, attn.to_queries, attn.to_keys_values, attn.project, norm2, mlp.fc1, mlp.fc2}.*}`
        (transformer mapper, converted onto nn.TransformerEncoder), plus `gpt.*` (a GPT2LMHeadModel state dict).
        The LM architecture comes from `config.lm` (only its config is read; weights come from the file).
        """
        from raycap.models.torch_io import load_tensors

        sd = load_tensors(pt_path)  # tensors only: a pickled object is refused in one line
        if not isinstance(sd, dict):
            raise UserError(f"{pt_path} is not an original ClipCap state dict (got {type(sd).__name__})")
        mapper_sd = {k[len("clip_project."):]: v for k, v in sd.items() if k.startswith("clip_project.")}
        lm_sd = {k[len("gpt."):]: v for k, v in sd.items() if k.startswith("gpt.")}
        other = [k for k in sd if not k.startswith(("clip_project.", "gpt."))]
        if other:
            raise UserError(f"{pt_path}: unexpected keys in original ClipCap checkpoint: {other[:5]}")
        if config.mapper == "transformer":
            mapper_sd = _convert_original_transformer_mapper(mapper_sd)
        model = cls(config, lm=_build_lm(config.lm, weights=False))

        def check(name, module, given, optional=()):
            expected = module.state_dict().keys()
            missing = [k for k in expected if k not in given and k not in optional]
            unexpected = [k for k in given if k not in expected]
            if missing or unexpected:
                raise UserError(f"{pt_path}: {name} keys do not match config (mapper={config.mapper!r}, "
                                 f"lm={config.lm!r}): missing {missing[:5]}, unexpected {unexpected[:5]}")

        check("clip_project", model.mapper, mapper_sd)
        # old transformers stored causal-mask buffers (attn.bias / attn.masked_bias); the head may be tied
        lm_sd = {k: v for k, v in lm_sd.items()
                 if k in model.lm.state_dict() or not re.search(r"attn\.(masked_)?bias$", k)}
        tied = ["lm_head.weight"] if model.lm.config.tie_word_embeddings else []
        check("gpt", model.lm, lm_sd, optional=tied)
        model.mapper.load_state_dict(mapper_sd)
        model.lm.load_state_dict(lm_sd, strict=False)
        model.lm.tie_weights()
        return model
