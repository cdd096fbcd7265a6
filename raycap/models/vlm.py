"""Any Hugging Face vision-language model as a raycap captioner: an `AutoModelForImageTextToText` (LLaVA,
Idefics3 / SmolVLM, Qwen2-VL, PaliGemma, ...) and its `AutoProcessor`, asked for a caption by a fixed prompt.

What RL trains is the language model: LoRA adapters on it (`raycap.models.lora`, through peft), optionally with
the multimodal projector; the vision tower stays frozen and in eval mode. The captioner reads the images' pixel
values, not the retriever's embeddings (`reads_retriever_embeddings` is False): every batch runs the frozen tower
(and the projector) from pixels on the model's device, once per image however many captions are scored for it.

Pixel rows. Every image is given the same shape (with `config.image_size`, resized to that square first; the
processors of LLaVA and PaliGemma make every image one shape anyway), so the processor's image inputs of one
image are one fixed-shape row and the prompt's token ids (its image placeholders expanded) are one template,
shared by every image. `pixels(images)` gives the rows (N, *row_shape) as `ImageRows` wants them (through
`captioner.processor`, an image-only stand-in for the HF processor), and the image inputs that do not vary
(Qwen2-VL's `image_grid_thw`, Idefics3's `pixel_attention_mask`) come from the template.

Decoding (greedy, sampled, beam, with or without the KV cache) and teacher-forced log-probs are
`raycap.models.decoding`'s, as for ClipCap and BLIP: the decoding state of a batch is its image features (the
projector's output, (N, image tokens, LM width)), handed to the model as `mm_encoder_outputs` with the prompt's ids,
so the model places them, builds its own positions (Qwen2-VL's M-RoPE) and masks (PaliGemma's bidirectional
prefix). Captions are the token ids after the prompt, ending at a stop token, as the other kinds return them;
teacher forcing scores exactly those (the prompt and image positions are never scored).

A directory (`save_pretrained`): `raycap_vlm.json` (this config, and the LoRA settings if it has adapters),
`vlm/` (the base model without adapters, and the processor), `adapter.safetensors` (the adapters, and the
projector when it trains, by parameter name) and `tokenizer/` (the processor's tokenizer, for the reward side).
`merge_and_save(dir)` writes the merged model and the processor as a plain HF directory that
`AutoModelForImageTextToText.from_pretrained` loads.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from raycap.errors import UserError
from raycap.models import lora, precision
from raycap.models.decoding import Decoding, cached_forward, keeps_logits, repeat_rows, soft_embeddings

CONFIG_NAME = "raycap_vlm.json"
MODEL_DIR = "vlm"
ADAPTER_NAME = "adapter.safetensors"
TOKENIZER_DIR = "tokenizer"

# where the HF VLMs keep their parts (first match wins)
LANGUAGE_MODELS = ("language_model", "text_model")
PROJECTORS = ("multi_modal_projector", "connector", "visual.merger", "mm_projector")
NOT_INPUTS = ("labels",)  # per-token rows a processor returns that are no model input (PaliGemma's labels)
FALLBACK_TARGETS = ["q_proj", "v_proj"]  # LoRA targets when peft knows no default for the LM type
NEVER = -1e9  # the logit of a token the captioner must never emit (exp() is 0 in fp32)


@dataclass
class VlmCaptionerConfig:
    prompt: str = ""                   # what the model is asked; the image goes before it
    chat_template: bool = True         # wrap the prompt in the processor's chat template, when it has one
    image_size: int | None = None      # resize every image to this square first (None: as the processor does)
    stop_token_ids: list[int] = field(default_factory=list)  # what ends a caption (default: the eos ids)
    pad_token_id: int = 0
    max_new_tokens: int = 40
    train_projector: bool = False      # the multimodal projector trains with the LM's adapters
    lora: dict | None = None           # the adapters' settings (r, alpha, dropout, target_modules), if any
    clip_dim: int | None = None        # not read: the captioner reads its own vision tower, not the retriever's


def submodule(root: nn.Module, names) -> nn.Module | None:
    for name in names:
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    return None


class VlmPixels:
    """The image side of a VLM's processor, one fixed-shape row per image: `self(images=..., return_tensors="pt")`
    -> {"pixel_values": (N, *row_shape)}, the call `raycap.inputs.ImageRows` makes on `captioner.processor`.
    Small and picklable (the image processor and two shapes), so it travels with an `ImageRows` to Ray actors."""

    def __init__(self, image_processor, image_size: int | None, pixel_shape: tuple[int, ...] | None = None):
        self.image_processor, self.image_size = image_processor, image_size
        self.pixel_shape = pixel_shape  # one image's `pixel_values` as the processor lays it out

    @property
    def row_shape(self) -> tuple[int, ...]:
        s = tuple(self.pixel_shape)
        return s[1:] if s[0] == 1 else s

    def prepare(self, images) -> list:
        from PIL import Image

        out = [image.convert("RGB") for image in images]
        if self.image_size:
            size = (self.image_size, self.image_size)
            out = [im if im.size == size else im.resize(size, Image.Resampling.BICUBIC) for im in out]
        return out

    def __call__(self, images=None, return_tensors: str = "pt", **_) -> dict:
        images = self.prepare(images)
        pv = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        want = len(images) * math.prod(self.pixel_shape)
        if pv.numel() != want:
            raise UserError(f"the VLM's image processor gives {tuple(pv.shape)} pixel values for {len(images)} "
                            f"images, not {len(images)} x {tuple(self.pixel_shape)}: its images vary in shape; set "
                            "the captioner's image_size (every image resized to that square)")
        return {"pixel_values": pv.reshape(len(images), *self.row_shape).float()}


class VlmCaptioner(Decoding, nn.Module):
    reads_retriever_embeddings = False
    lora_fallback_targets = FALLBACK_TARGETS  # LoRA's targets in an LM type peft has no default for

    def __init__(self, model, processor, config: VlmCaptionerConfig):
        super().__init__()
        self.model, self.hf_processor, self.config = model, processor, config
        if not config.stop_token_ids:
            config.stop_token_ids = default_stop_ids(model, processor.tokenizer)
        self.stop_ids = sorted(set(config.stop_token_ids))
        self.placeholder_ids = placeholder_ids(model, processor)
        self._forward_args = set(inspect.signature(model.forward).parameters)
        self._build_template()
        precision.fp32_head(model)  # log-probs from fp32 logits under bf16 autocast too
        self.set_trainable(True)

    @property
    def _encoder(self):
        """The model's image encoder: pixel inputs -> the projector's features (`pooler_output`)."""
        return self.model.base_model.get_image_features

    # -- the prompt and the image rows -----------------------------------------------------------------------
    def prompt_text(self) -> str:
        """The processor's text for one image: the chat template's user turn (image, then the prompt) and its
        generation prompt, or the prompt itself with the image token put before it when it has none."""
        p, prompt = self.hf_processor, self.config.prompt
        if self.config.chat_template and getattr(p, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return p.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(p, "image_token", None)
        return token + prompt if token and token not in prompt else prompt

    def _build_template(self) -> None:
        """The prompt's model inputs for one image of the fixed shape, split into the text side (one row shared by
        every image) and the image side (one row per image: `pixel_values`; the rest is the same for every
        image); and `self.processor`, the image side's stand-in for `ImageRows`."""
        from PIL import Image

        image_processor = self.hf_processor.image_processor
        size = self.config.image_size or 64  # without image_size, the processor must make every image one shape
        dummy = Image.new("RGB", (size, size), (0, 0, 0))
        pixels = VlmPixels(image_processor, self.config.image_size)
        if not self.config.image_size:  # a square and a wide image: one pixel shape, the same other inputs
            wide = Image.new("RGB", (size, size // 2))
            a, b = (image_processor(images=[im], return_tensors="pt") for im in (dummy, wide))
            if a["pixel_values"].shape != b["pixel_values"].shape or any(
                    isinstance(v, Tensor) and k != "pixel_values" and not torch.equal(v, b[k]) for k, v in a.items()):
                raise UserError(f"{type(image_processor).__name__} gives images of different shapes different inputs "
                                "(pixel shapes, masks or numbers of image tokens); set the captioner's image_size "
                                "(every image resized to that square)")
        text, image = self.prompt_text(), pixels.prepare([dummy])[0]
        out = self.hf_processor(text=[text], images=[image], return_tensors="pt")
        encoder_args = set(inspect.signature(self._encoder).parameters)
        per_token = out["input_ids"].shape
        self._text = {k: v for k, v in out.items()
                      if isinstance(v, Tensor) and v.shape == per_token and k not in NOT_INPUTS}
        self._caption_values = self._caption_types(text, image)
        pv = out["pixel_values"]
        self._image = {k: v for k, v in out.items()
                       if k in encoder_args and k != "pixel_values" and isinstance(v, Tensor)}
        pixels.pixel_shape = tuple(pv.shape)
        mine = pixels([dummy])["pixel_values"]
        if mine.numel() != pv.numel() or not torch.allclose(mine.reshape(pv.shape), pv.float(), atol=1e-5):
            raise UserError(f"{type(self.hf_processor).__name__}: its image processor alone does not give the pixel "
                            "values the processor gives; this VLM is not supported as a raycap captioner")
        self.processor = pixels
        p = next(self.model.parameters())
        with torch.no_grad():  # how the model wants its features back: a list per image, or one image's shape
            pooled = self._encoder(pixel_values=pv.to(p.device, p.dtype), return_dict=True,
                                   **{k: v.to(p.device) for k, v in self._image.items()}).pooler_output
        self._pooled_shape = None if isinstance(pooled, (list, tuple)) else tuple(pooled.shape)

    def _caption_types(self, text: str, image) -> dict[str, int]:
        """What each per-token input other than the ids holds at a caption token: 1 in the attention mask; in a
        type row (Qwen2-VL's `mm_token_type_ids`, Gemma 3's `token_type_ids`) a text token's value, read at the
        prompt's last token; with a processor that types a suffix (PaliGemma: the prefix is attended both ways,
        the suffix causally), the suffix's."""
        values = {k: int(v[0, -1]) for k, v in self._text.items() if k not in ("input_ids", "attention_mask")}
        values["attention_mask"] = 1
        if "suffix" in inspect.signature(type(self.hf_processor).__call__).parameters:
            typed = self.hf_processor(text=[text], images=[image], suffix=["a"], return_tensors="pt")
            values.update({k: int(typed[k][0, -1]) for k in values if k != "attention_mask" and k in typed})
        return values

    def pixels(self, images) -> Tensor:
        """PIL images -> their pixel rows (N, *row_shape), fp32 on the CPU."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @property
    def cached_input_shape(self) -> tuple[int, ...]:
        """What a run caches per image (`raycap.inputs`): one pixel row."""
        return self.processor.row_shape

    @torch.no_grad()
    def encode_images(self, images) -> Tensor:
        """What a run caches per image for this captioner: its pixel rows (the features are the projector's
        output, which may train, so they are made per batch in `_start`)."""
        return self.pixels(images)

    # -- the parts ------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        lm = submodule(self.model.base_model, LANGUAGE_MODELS)
        if lm is None:
            lm = self.model.get_decoder()
        return lm

    @property
    def projector(self) -> nn.Module | None:
        return submodule(self.model.base_model, PROJECTORS)

    @property
    def image_side(self) -> list[nn.Module]:
        """The modules besides the language model: the vision tower and the projector (which may sit inside the
        tower: Qwen2-VL's `visual.merger`)."""
        lm = self.language_model
        return [m for m in self.model.base_model.children() if m is not lm]

    def frozen_parameters(self) -> dict[str, nn.Parameter]:
        """The vision tower's parameters, by name: frozen whatever RL trains (the projector is not among them)."""
        proj = self.projector
        skip = {id(p) for p in proj.parameters()} if proj is not None else set()
        keep = {id(p) for m in self.image_side for p in m.parameters()} - skip
        return {n: p for n, p in self.model.named_parameters() if id(p) in keep}

    @property
    def lora_target(self) -> nn.Module:
        """The module `captioner.lora` adapts: the language model."""
        return self.language_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the protocol ---------------------------------------------------------------------------------------
    def set_trainable(self, train_lm: bool) -> None:
        """RL trains the language model's adapters (all of the LM and its head when it has none and `train_lm`),
        and the projector when `config.train_projector`; the vision tower stays frozen."""
        self.model.requires_grad_(False)
        lm = self.language_model
        if lora.has_lora(lm):
            lora.mark_trainable(lm)
        else:
            lm.requires_grad_(train_lm)
            self.model.get_output_embeddings().requires_grad_(train_lm)
        if self.config.train_projector:
            if self.projector is None:
                raise UserError(f"{type(self.model).__name__}: no multimodal projector found ({', '.join(PROJECTORS)}) "
                                "to train; set train_projector: false")
            self.projector.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.image_side:
            m.eval()
        if mode and self.config.train_projector and self.projector is not None:
            self.projector.train()
        return self

    def add_lora(self, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules: list[str] | None = None,
                 seed: int = 0) -> None:
        """Adapters on the language model (peft's default targets for its type, else q_proj and v_proj), the only
        LM weights that then train."""
        lm = self.language_model
        lora.add_lora(lm, r, alpha, dropout, target_modules or lora.default_targets(lm, FALLBACK_TARGETS), seed=seed)
        self.set_trainable(True)

    @torch.no_grad()
    def merge_adapters(self) -> None:
        """Add each adapter's update into its base weight in place and put the plain layers back: the model is its
        HF architecture again (a policy that should get fresh adapters starts from here)."""
        if not lora.has_lora(self.model):
            return
        layer = lora._lora_layer_class()
        for name, m in list(self.model.named_modules()):
            if isinstance(m, layer):
                m.merge()
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, m.get_base_layer())
        for m in self.model.modules():
            m.__dict__.pop("peft_config", None)
        self.set_trainable(True)

    def _start(self, inputs: Tensor) -> Tensor:
        """Pixel rows (N, *row_shape) -> image features (N, image tokens, LM width): the frozen tower and the
        projector, once per image, on the model's device (with gradients only into a projector that trains)."""
        rows = inputs.to(self.device)
        N = rows.shape[0]
        shape = self.processor.pixel_shape
        pv = rows.reshape(N * shape[0], *shape[1:]).to(next(self.model.parameters()).dtype)
        extra = {k: v.to(self.device).repeat(N, *([1] * (v.dim() - 1))) for k, v in self._image.items()}
        grad = torch.is_grad_enabled() and self.config.train_projector and any(
            p.requires_grad for p in self.projector.parameters())
        with torch.set_grad_enabled(grad):
            out = self._encoder(pixel_values=pv, **extra, return_dict=True).pooler_output
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in out]) if isinstance(out, (list, tuple)) \
            else out.reshape(-1, out.shape[-1])
        return flat.reshape(N, -1, flat.shape[-1])

    def _inputs(self, feats: Tensor, tokens: Tensor) -> dict:
        """The model's inputs for [prompt; tokens] after each image (the rows of `feats`): the prompt's template
        and the tokens as caption text (PaliGemma: its suffix, attended causally)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        N, dev = tokens.shape[0], feats.device

        def rows(t: Tensor) -> Tensor:
            return t.to(dev).expand(N, *t.shape[1:]) if t.shape[0] == 1 else t.to(dev)

        tokens = tokens.to(dev)
        tail = {k: torch.full_like(tokens, value) for k, value in self._caption_values.items()}
        tail["input_ids"] = tokens
        kw = {k: torch.cat([rows(v), tail[k].to(v.dtype)], 1) for k, v in self._text.items()
              if k in self._forward_args}
        kw.update({k: v.to(dev).repeat(N, *([1] * (v.dim() - 1))) for k, v in self._image.items()
                   if k in self._forward_args and k != "pixel_attention_mask"})
        if self._pooled_shape is None:  # LLaVA, Qwen2-VL, Idefics3: one (tokens, width) tensor per image
            pooled = list(feats)
        else:  # PaliGemma: one tensor, laid out as the encoder gives it
            pooled = feats.reshape(N * self._pooled_shape[0], *self._pooled_shape[1:])
        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return kw

    def _step(self, feats: Tensor, tokens: Tensor, past, use_cache: bool):
        """Next-token logits (N, V) after [prompt; tokens]; with a cache only the last token is fed."""
        tokens = tokens.to(feats.device)
        last = {"logits_to_keep": 1} if keeps_logits(type(self.model)) else {}
        if use_cache and past is not None:
            out, past = cached_forward(self.model, past, input_ids=tokens[:, -1:])
        elif use_cache:
            out, past = cached_forward(self.model, None, **self._inputs(feats, tokens), **last)
        else:
            out, past = self.model(**self._inputs(feats, tokens), use_cache=False, **last), None
        return self._allowed(out.logits[:, -1].float()), past

    def _allowed(self, logits: Tensor) -> Tensor:
        """Logits with the image placeholder tokens ruled out: a caption holding one would be taken for an image
        slot when it is scored (the model counts them), so the policy never emits them. The floor is finite
        (NEVER): their probability is exactly 0 in fp32, while the sums over the vocabulary that the entropy and
        the full KL take (p * log p) stay 0 for them instead of 0 * inf = nan."""
        if not self.placeholder_ids:
            return logits
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[[i for i in self.placeholder_ids if i < logits.shape[-1]]] = True
        return logits.masked_fill(banned, NEVER)

    # -- soft tokens (Gumbel-softmax decoding, `raycap.rl.gumbel`) ---------------------------------------------
    soft_decoding = True

    def soft_start(self, inputs: Tensor):
        """(the first caption token's logits (N, V) fp32, the KV cache) after each image and the prompt."""
        feats = self._start(inputs)
        empty = torch.zeros(feats.shape[0], 0, dtype=torch.long, device=feats.device)
        return self._step(feats, empty, None, use_cache=True)  # the decoder's first step, with gradients

    def soft_step(self, probs: Tensor, past):
        """(the next logits, the cache) after feeding soft tokens (N, V) as their input embeddings."""
        x = soft_embeddings(self.model.get_input_embeddings(), probs)
        out, past = cached_forward(self.model, past, inputs_embeds=x)
        return self._allowed(out.logits[:, -1].float()), past

    def logits(self, inputs: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced next-token logits (N, T, V), fp32: row t predicts tokens[:, t] after the prompt and
        tokens[:, :t]; `inputs` (pixel rows) may have N/k rows (the num_samples layout)."""
        feats = repeat_rows(self._start(inputs), tokens.shape[0])  # the tower once per image
        T = tokens.shape[1]
        kw = self._inputs(feats, tokens.to(feats.device)[:, :-1])
        if keeps_logits(type(self.model)):
            return self._allowed(self.model(**kw, use_cache=False, logits_to_keep=T).logits.float())
        return self._allowed(self.model(**kw, use_cache=False).logits[:, -T:].float())

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _lora_settings(self) -> dict | None:
        lm = self.language_model
        if not lora.has_lora(lm):
            return None
        c = lm.peft_config["default"]
        return {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                "target_modules": sorted(c.target_modules) if not isinstance(c.target_modules, str)
                else c.target_modules}

    @torch.no_grad()
    def plain_state_dict(self, merge: bool) -> dict[str, Tensor]:
        """The model's state dict under the plain architecture's names, without the adapters (`merge`: with each
        adapter's update added to its base weight). No copy of the model is made."""
        layer = lora._lora_layer_class() if lora.has_lora(self.model) else None
        sd = {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items()
              if lora.LORA_MARK not in k}
        if merge and layer is not None:
            for name, m in self.model.named_modules():
                if isinstance(m, layer):
                    w = sd[f"{name}.weight"]
                    delta = sum(m.get_delta_weight(a) for a in m.active_adapters)
                    sd[f"{name}.weight"] = (w.float() + delta.float()).to(w.dtype)
        return sd

    def trained_state(self) -> dict[str, Tensor]:
        """What `save_pretrained` keeps beside the base model: the adapters, and the projector if it trains."""
        proj = self.projector
        names = {n for n, _ in proj.named_parameters(prefix=_name_of(self.model, proj))} \
            if self.config.train_projector and proj is not None else set()
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.model.named_parameters()
                if lora.LORA_MARK in n or n in names}

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config, lora=self._lora_settings())
        (path / CONFIG_NAME).write_text(json.dumps({"kind": "vlm", **dataclasses.asdict(config)}, indent=2))
        self.model.save_pretrained(path / MODEL_DIR, state_dict=self.plain_state_dict(merge=False))
        self.hf_processor.save_pretrained(str(path / MODEL_DIR))
        self.hf_processor.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        state = self.trained_state()
        if state:
            save_file(state, str(path / ADAPTER_NAME))
        elif (path / ADAPTER_NAME).exists():
            (path / ADAPTER_NAME).unlink()

    def merge_and_save(self, path) -> None:
        """The merged model (adapters added into their weights) and the processor as a plain HF directory, loaded
        by `AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=self.plain_state_dict(merge=True))
        self.hf_processor.save_pretrained(str(path))

    export = merge_and_save

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "VlmCaptioner":
        from raycap.models.safetensors_io import load_weights

        path = Path(path)
        d = json.loads((path / CONFIG_NAME).read_text())
        if d.pop("kind", None) != "vlm":
            raise UserError(f"{path / CONFIG_NAME}: not a raycap VLM captioner (kind is not 'vlm')")
        fields = {f.name for f in dataclasses.fields(VlmCaptionerConfig)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown VlmCaptionerConfig fields in overrides: {bad}")
        config = VlmCaptionerConfig(**{**{k: v for k, v in d.items() if k in fields}, **overrides})
        settings, config.lora = config.lora, None
        model, processor = load_vlm(path / MODEL_DIR)
        cap = cls(model, processor, config)
        if settings:
            cap.add_lora(settings["r"], settings["alpha"], settings["dropout"], settings["target_modules"])
        if (path / ADAPTER_NAME).is_file():
            lora.load_trainable(cap.model, load_weights(path / ADAPTER_NAME))
        cap.set_trainable(True)
        return cap

    @classmethod
    def from_hf(cls, name_or_path: str, prompt: str = "", max_new_tokens: int = 40, image_size: int | None = None,
                chat_template: bool = True, train_projector: bool = False,
                stop_token_ids: list[int] | None = None) -> "VlmCaptioner":
        """An HF VLM (name or directory: an `AutoModelForImageTextToText` and its processor) as a raycap
        captioner."""
        model, processor = load_vlm(name_or_path)
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(model, processor, VlmCaptionerConfig(
            prompt=prompt, chat_template=chat_template, image_size=image_size,
            stop_token_ids=list(stop_token_ids or []), pad_token_id=pad or 0, max_new_tokens=max_new_tokens,
            train_projector=train_projector))


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


PLACEHOLDER_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                    "vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id",
                    "boi_token_index", "eoi_token_index", "fake_image_token_id", "global_image_token_id")


def placeholder_ids(model, processor) -> list[int]:
    """The token ids that stand for image (or video) inputs and their brackets, from the model's config and the
    processor: the model replaces or counts them, so they are no caption tokens."""
    ids = set()
    for source in (model.config, processor):
        for key in PLACEHOLDER_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    unk = processor.tokenizer.unk_token_id
    return sorted(ids - {unk, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id})


def default_stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a caption: the tokenizer's eos and the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


def load_vlm(name_or_path):
    """(AutoModelForImageTextToText, AutoProcessor) of a name or directory; one line if it cannot load."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:  # fp32 weights, as every raycap policy has them (bf16 is the autocast of a role's forward passes)
        model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), use_safetensors=True,
                                                            dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise UserError(f"VLM {str(name_or_path)!r}: cannot load it ({str(e).splitlines()[0]}); give a local "
                        "directory of an AutoModelForImageTextToText with its processor files") from None
    return model, processor
