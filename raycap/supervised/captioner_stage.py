"""The supervised stage for any captioner on any dataset: `python -m raycap.pretrain captioner --config FILE.yaml
--out DIR`.

A ClipCap (MLP or Transformer mapper, LM frozen or trained: the four variants) over any HF causal LM, by name or
local path, with its own tokenizer (GPT-2's BPE, a LLaMA-style SentencePiece/BPE, or one trained locally), is
trained with cross-entropy on the references of the config's `data.splits.train` split (any reader: the world's
`labelled` split, Karpathy, COCO, a captioned folder), reading the frozen retriever's cached image embeddings.
Writes DIR/captioner/ (the captioner and its tokenizer, loadable by `raycap.train` as `captioner.path`),
DIR/config.json and DIR/metrics.json (greedy captions of the test split: P@1 among 100 and, on the world, the
caption checks).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycap.config import DataConfig, RetrieverConfig, check_override_key, parse_overrides, read_yaml_mapping, set_dotted
from raycap.errors import UserError, format_validation_error


KIND_FIELDS = {  # the model settings each kind reads; setting another kind's is refused
    "clipcap": {"lm", "tokenizer", "mapper", "prefix_length", "mapper_layers", "clip_length", "train_lm", "image_input"},
    "blip": {"blip", "tokenizer", "train_vision"},
    "vlm": {"vlm", "prompt", "image_size", "lora_r", "lora_alpha", "train_projector"},
}


class CaptionerModelConfig(BaseModel):
    """Which captioner to build: ClipCap's mapper over an HF causal LM with its tokenizer, a BLIP, or an HF
    vision-language model with LoRA adapters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["clipcap", "blip", "vlm"] = "clipcap"
    lm: str | None = Field(None, description="clipcap: HF causal LM, a name (gpt2) or a local directory")
    blip: str | None = Field(None, description="blip: a BlipForConditionalGeneration name or directory")
    vlm: str | None = Field(None, description="vlm: an HF vision-language model (AutoModelForImageTextToText and its "
                            "processor), a name or a directory")
    prompt: str = Field("", description="vlm: what the model is asked; the image goes before it")
    image_size: int | None = Field(None, ge=1, description="vlm: every image resized to this square first (needed "
                                   "by processors whose image shapes vary, e.g. Qwen2-VL's)")
    lora_r: int = Field(8, ge=0, description="vlm: LoRA rank of the adapters on its language model, the weights "
                        "that train (0: none, the whole language model trains)")
    lora_alpha: float = Field(16.0, gt=0, description="vlm: LoRA alpha")
    train_projector: bool = Field(False, description="vlm: train the multimodal projector too")
    train_vision: bool = Field(False, description="blip: train its vision tower too in this stage (a BLIP "
                               "trained from scratch); RL always freezes it")
    tokenizer: str | None = Field(None, description="HF tokenizer name or directory (default: the LM's)")
    mapper: Literal["mlp", "transformer"] = "mlp"
    prefix_length: int = Field(10, ge=1)
    mapper_layers: int = Field(8, ge=1, description="transformer mapper only")
    clip_length: int = Field(10, ge=1, description="transformer mapper only")
    train_lm: bool = Field(True, description="False: the LM is frozen and only the mapper trains")
    image_input: Literal["embedding", "tokens"] = Field(
        "embedding", description="clipcap: what it reads, the retriever's pooled embedding or its image tower's "
        "patch tokens (a ViT's; through a Transformer mapper)")

    @model_validator(mode="after")
    def _one_model(self):
        other = sorted(self.model_fields_set - KIND_FIELDS[self.kind] - {"kind"})
        if other:
            raise ValueError(f"model.{other[0]}: not a setting of a {self.kind} captioner (its settings: "
                             f"{', '.join(sorted(KIND_FIELDS[self.kind]))})")
        if self.kind == "clipcap" and not self.lm:
            raise ValueError("model.lm: a ClipCap needs its language model (a name or a directory)")
        if self.kind == "blip" and not self.blip:
            raise ValueError("model.blip: a BLIP captioner needs its checkpoint (a name or a directory)")
        if self.kind == "vlm" and not self.vlm:
            raise ValueError("model.vlm: a VLM captioner needs its checkpoint (a name or a directory)")
        if self.image_input == "tokens" and self.mapper != "transformer":
            raise ValueError("model.image_input: tokens needs model.mapper: transformer (an MLP reads one embedding)")
        return self


class CaptionerTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=1)
    max_new_tokens: int = Field(40, ge=2, description="longest caption, in tokens of the captioner's tokenizer")
    val_images: int = Field(500, ge=1, description="validation images whose loss is logged per epoch")


class CaptionerStageConfig(BaseModel):
    """The supervised captioner stage: which images and references, which frozen retriever, which captioner."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|meta|cuda(:\d+)?)$",
                        description="where the captioner trains and the retriever encodes: auto (cuda when visible)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of the GPU a VLM's stage trains on, for the "
                                        "memory check before it starts (default: the device's)")
    data: DataConfig = DataConfig(splits={"train": "labelled", "val": "val", "test": "test"})
    retriever: RetrieverConfig = RetrieverConfig()
    model: CaptionerModelConfig
    training: CaptionerTrainingConfig = CaptionerTrainingConfig()
    eval_images: int = Field(1000, ge=100, description="test images of the final evaluation (P@1 among 100)")


def load_stage_config(path: str | Path, overrides: list[str] = ()) -> CaptionerStageConfig:
    """A YAML file of `CaptionerStageConfig` with `key=value` overrides; every mistake one line."""
    data = read_yaml_mapping(Path(path))
    for key, value in parse_overrides(list(overrides)):
        check_override_key(key, CaptionerStageConfig)
        set_dotted(data, key, value)
    try:
        return CaptionerStageConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None


def build_captioner(model: CaptionerModelConfig, clip_dim: int, max_new_tokens: int,
                    token_shape: tuple[int, int] | None = None):
    """(ClipCap over the configured LM, or the configured BLIP; its tokenizer), which must fit the vocabulary.
    `token_shape`: the retriever's (tokens, width), for a ClipCap reading its patch tokens."""
    from raycap.models.clipcap import ClipCap, ClipCapConfig
    from raycap.models.tokenizers import load_tokenizer

    if model.kind == "vlm":
        return build_vlm(model, max_new_tokens)
    if model.kind == "blip":
        from raycap.models.blip import BlipCaptioner

        tokenizer = load_tokenizer(model.tokenizer or model.blip)
        captioner = BlipCaptioner.from_blip(model.blip, tokenizer, max_new_tokens, model.train_vision)
        vocab = captioner.model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise UserError(f"model.tokenizer {model.tokenizer or model.blip}: {len(tokenizer)} tokens but the BLIP "
                            f"decoder has {vocab}")
        return captioner, tokenizer
    tokenizer = load_tokenizer(model.tokenizer or model.lm)
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.tokenizer {model.tokenizer or model.lm}: has no eos token, which ends captions")
    clip_length = model.clip_length
    if model.image_input == "tokens":
        clip_length, clip_dim = token_shape
    captioner = ClipCap(ClipCapConfig(clip_dim=clip_dim, prefix_length=model.prefix_length, mapper=model.mapper,
                                      mapper_layers=model.mapper_layers, clip_length=clip_length, lm=model.lm,
                                      image_input=model.image_input,
                                      train_lm=model.train_lm, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens))
    vocab = captioner.lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UserError(f"model.tokenizer {model.tokenizer or model.lm}: {len(tokenizer)} tokens but the LM "
                        f"{model.lm} embeds only {vocab}")
    captioner.set_trainable(model.train_lm)
    return captioner, tokenizer


def build_vlm(model: CaptionerModelConfig, max_new_tokens: int):
    """(an HF VLM as a raycap captioner with LoRA adapters of rank `lora_r` on its language model, or none; its
    processor's tokenizer): only the adapters (and the projector with `train_projector`) train, the vision tower
    stays frozen."""
    from raycap.models.vlm import VlmCaptioner

    captioner = VlmCaptioner.from_hf(model.vlm, prompt=model.prompt, max_new_tokens=max_new_tokens,
                                     image_size=model.image_size, train_projector=model.train_projector)
    if model.lora_r:
        captioner.add_lora(r=model.lora_r, alpha=model.lora_alpha)
    tokenizer = captioner.hf_processor.tokenizer
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.vlm {model.vlm}: its tokenizer has no eos token, which ends captions")
    if tokenizer.pad_token is None:  # the references are padded to a batch (never scored past their lengths)
        tokenizer.pad_token = tokenizer.eos_token
    return captioner, tokenizer


def stage_inputs(captioner, source, embeddings, n: int, log=print, retriever=None):
    """What the stage trains on for the first n images: the retriever's embeddings (ClipCap), BLIP's frozen
    features, or BLIP's pixel values when its vision tower trains too."""
    from raycap.inputs import captioner_inputs

    if getattr(captioner.config, "train_vision", False):
        return captioner.pixels([source.image(i) for i in range(n)])
    return captioner_inputs(captioner, source.subset(range(n)) if n < len(source) else source, embeddings[:n],
                            log=log, retriever=retriever)


def run_captioner_stage(cfg: CaptionerStageConfig, out: Path, log=print) -> dict:
    """Train, save and evaluate; returns the test metrics (also in out/metrics.json)."""
    import torch

    from raycap.config import RunConfig
    from raycap.inputs import load_retriever, open_split
    from raycap.memory import check_stage_fits
    from raycap.models.devices import resolve_device
    from raycap.supervised.captioner import CaptionerTraining, evaluate_images, train_on_references

    check_stage_fits(cfg.model, cfg.device, cfg.gpu_memory_gb)  # from the VLM's config alone: before any file
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    retriever = load_retriever(cfg.retriever).to(device)
    run = RunConfig(data=cfg.data, retriever=cfg.retriever)  # what open_split reads: data, retriever, runtime
    splits = {role: open_split(run, retriever, role, log) for role in ("train", "val", "test")}
    for role in ("train", "val"):
        if not splits[role].source.labelled:
            raise UserError(f"data.splits.{role}: the supervised stage needs references, and "
                            f"{splits[role].source.name} has none")
    if len(splits["test"].source) < 100:  # the final evaluation's P@1, after the training: refused before it
        raise UserError(f"data.splits.test ({cfg.data.splits['test']}): {len(splits['test'].source)} images; the "
                        "final evaluation ranks each among 100 (P@1), so at least 100 are needed")
    torch.manual_seed(cfg.seed)
    token_shape = retriever.token_shape if cfg.model.image_input == "tokens" else None  # a ViT's, or one line
    captioner, tokenizer = build_captioner(cfg.model, retriever.embed_dim, cfg.training.max_new_tokens, token_shape)
    captioner.to(device)
    t = cfg.training
    training = CaptionerTraining(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                                 warmup_steps=t.warmup_steps, max_new_tokens=t.max_new_tokens, seed=cfg.seed)
    train, val = splits["train"], splits["val"]
    n_val = min(t.val_images, len(val.source))
    refs = [train.source.references(i) for i in range(len(train.source))]
    val_refs = [val.source.references(i) for i in range(n_val)]
    train_inputs, val_inputs = (stage_inputs(captioner, s.source, s.embeddings, n, log, retriever)
                                for s, n in ((train, len(train.source)), (val, n_val)))
    t0 = time.time()
    train_on_references(captioner, tokenizer, train_inputs, refs, val_inputs, val_refs, training, out / "work", log)
    seconds = round(time.time() - t0, 1)
    if getattr(captioner.config, "train_vision", False):  # RL and evaluation read frozen features from here on
        captioner.config.train_vision = False
        captioner.set_trainable(True)
    captioner.save_pretrained(out / "captioner")
    tokenizer.save_pretrained(str(out / "captioner" / "tokenizer"))
    test = splits["test"]
    from raycap.inputs import captioner_inputs

    n_test = min(cfg.eval_images, len(test.source))
    metrics = evaluate_images(captioner, tokenizer, retriever, test.source, test.embeddings, n_test,
                              inputs=captioner_inputs(captioner, test.source.subset(range(n_test)),
                                                      test.embeddings[:n_test], log=log, retriever=retriever))
    metrics |= {"train_images": len(refs), "epochs": t.epochs, "train_seconds": seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log("captioner (test): " + json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
    return metrics
