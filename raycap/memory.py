"""Memory planning: before a run loads a model or writes a file, estimate what one learner holds and refuse, in one
line, a config whose learner cannot fit its device (e.g. Qwen2-VL-2B fully fine-tuned on a 24 GB GPU).

The captioner is built from its config files alone on PyTorch's meta device (no weights read, no memory taken), so
a 7B VLM is counted in a second on a laptop. A learner holds, in fp32 (raycap keeps fp32 weights; bf16 is autocast):
the policy's weights; the frozen reference the KL guard reads (the captioner as loaded, without the run's
adapters); a gradient and Adam's two moments for every trained parameter (on the Ray runtime's DeepSpeed learners,
ZeRO stage 1 splits the moments, stage 2 the gradients too, over the learner ranks). Activations, the KV cache and
the retriever come on top, so the estimate is a floor: a config it refuses cannot fit, while one it passes may still
run out of memory. A directory the meta build cannot read is not checked here: loading it says what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from raycap.errors import UserError

FP32 = 4
GB = 1e9


@dataclass
class LearnerMemory:
    """What one learner rank holds, in parameters and bytes."""
    parameters: int         # the policy's, adapters included
    reference: int          # the frozen reference copy's
    trainable: int          # trained by RL (adapters, mapper or projector, or the whole LM)
    learners: int = 1
    zero_stage: int = 0

    @property
    def weights_bytes(self) -> int:
        return FP32 * (self.parameters + self.reference)

    @property
    def gradient_bytes(self) -> int:
        return FP32 * self.trainable // (self.learners if self.zero_stage >= 2 else 1)

    @property
    def optimizer_bytes(self) -> int:
        return 2 * FP32 * self.trainable // (self.learners if self.zero_stage >= 1 else 1)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes

    def breakdown(self) -> str:
        weights = "" if not self.reference else " (policy and KL reference)"
        return (f"{_amount(self.parameters)} parameters, {_amount(self.trainable)} trained: fp32 weights "
                f"{self.weights_bytes / GB:.1f} GB{weights}, gradients "
                f"{self.gradient_bytes / GB:.1f} GB, Adam {self.optimizer_bytes / GB:.1f} GB")


def _amount(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _lora_parameters(lm: nn.Module, r: int, targets: list[str]) -> int:
    """Parameters rank-`r` adapters add to `lm`'s `targets` (linear or GPT-2 Conv1D layers): r x (in + out) each."""
    n = 0
    for name, m in lm.named_modules():
        if name.split(".")[-1] not in targets:
            continue
        if isinstance(m, nn.Linear):
            n += r * (m.in_features + m.out_features)
        elif type(m).__name__ == "Conv1D":  # GPT-2's: weight (in, out)
            n += r * sum(m.weight.shape)
    return n


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass
class _Parts:
    model: nn.Module        # the whole captioner (meta tensors)
    lm: nn.Module           # what LoRA adapts and `train_lm` trains
    always: list            # modules RL always trains (ClipCap's mapper, a training projector)
    extra_lm: list          # modules trained with the LM when it has no adapters (an untied head)
    lm_trains: bool         # the directory lets its LM train (a ClipCap saved with train_lm false does not)
    lora: dict | None       # adapters the directory already has (a VLM's)
    fallback: list | None = None  # LoRA's targets where peft knows none for the LM type (a VLM's)


def _meta_parts(path: Path) -> _Parts | None:
    """The captioner in `path` built from its config files on the meta device."""
    from transformers import AutoConfig

    from raycap.models.loading import required_captioner_kind

    kind = required_captioner_kind(path)
    if kind == "clipcap":
        from transformers import AutoModelForCausalLM

        from raycap.models.clipcap import CONFIG_NAME, LM_DIR, ClipCap, ClipCapConfig

        d = json.loads((path / CONFIG_NAME).read_text())
        fields = {f.name for f in dataclasses.fields(ClipCapConfig)}
        config = ClipCapConfig(**{k: v for k, v in d.items() if k in fields})
        with torch.device("meta"):
            cap = ClipCap(config, lm=AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / LM_DIR)))
        return _Parts(cap, cap.lm, [cap.mapper], [], config.train_lm, None)
    if kind == "blip":
        from transformers import BlipForConditionalGeneration

        from raycap.models.blip import CONFIG_NAME, MODEL_DIR

        d = json.loads((path / CONFIG_NAME).read_text())
        with torch.device("meta"):
            model = BlipForConditionalGeneration(AutoConfig.from_pretrained(path / MODEL_DIR))
        return _Parts(model, model.text_decoder, [model.vision_model] if d.get("train_vision") else [], [], True,
                      None)
    if kind == "vlm":
        from raycap.models.vlm import CONFIG_NAME, MODEL_DIR

        d = json.loads((path / CONFIG_NAME).read_text())
        return vlm_parts(path / MODEL_DIR, d.get("train_projector", False), d.get("lora"))
    return None  # a kind this planner does not know: not checked


def vlm_parts(name_or_path, train_projector: bool = False, lora_settings: dict | None = None) -> _Parts:
    """An HF VLM (its config: a directory or a cached name) on the meta device, split as raycap trains it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from raycap.models.vlm import FALLBACK_TARGETS, LANGUAGE_MODELS, PROJECTORS, submodule

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(name_or_path)))
    lm = submodule(model.base_model, LANGUAGE_MODELS) or model.get_decoder()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    return _Parts(model, lm, [submodule(model.base_model, PROJECTORS)] if train_projector else [],
                  [] if tied or head is None else [head], True, lora_settings, list(FALLBACK_TARGETS))


def estimate(parts: _Parts, lora_settings=None, train_lm: bool = True, learners: int = 1,
             zero_stage: int = 0) -> LearnerMemory:
    """One learner's memory for a captioner split into `parts`, with the run's adapters (`lora_settings`: r and
    target_modules, or None) on its LM."""
    from raycap.models.lora import default_targets

    saved = parts.lora
    base = _count(parts.model)
    if saved:  # the directory's own adapters are part of the policy and of its reference
        base += _lora_parameters(parts.lm, saved["r"], saved["target_modules"]
                                 or default_targets(parts.lm, parts.fallback))
    always = sum(_count(m) for m in parts.always)
    settings = lora_settings or saved
    if settings:
        targets = settings.get("target_modules") or default_targets(parts.lm, parts.fallback)
        adapters = _lora_parameters(parts.lm, settings["r"], targets)
        added = adapters if lora_settings else 0  # the run's adapters are not in the reference
        return LearnerMemory(base + added, base, adapters + always, learners, zero_stage)
    lm = _count(parts.lm) + sum(_count(m) for m in parts.extra_lm) if train_lm and parts.lm_trains else 0
    return LearnerMemory(base, base, lm + always, learners, zero_stage)


def learner_estimate(cfg, runtime: str = "ray") -> LearnerMemory | None:
    """What one learner of the run `cfg` (a RunConfig) on `runtime` holds, from its captioner directory's config
    files; None when the directory cannot be built on the meta device (its loader then says why)."""
    try:
        parts = _meta_parts(Path(cfg.captioner.path))
    except UserError:
        raise
    except Exception:  # a config transformers cannot build, a missing file: the loader's own message follows
        return None
    if parts is None:
        return None
    lora = cfg.captioner.lora
    ray = runtime == "ray"  # the reference loop is one learner, without DeepSpeed
    return estimate(parts, None if lora is None else {"r": lora.r, "target_modules": lora.target_modules},
                    cfg.rl.optimiser.train_lm, cfg.runtime.learner_workers if ray else 1,
                    cfg.runtime.zero_stage if ray else 0)


def device_bytes(cuda: bool, device: str, gpu_memory_gb: float | None, remote: bool = False) -> tuple[int, str] | None:
    """(bytes, what they are) of the device a model trains on: on a GPU (`cuda`) `gpu_memory_gb`, else the memory of
    the CUDA device `device` names (cuda:N; auto: the first) when it is on this machine; else this machine's memory.
    None when unknown (a GPU not visible here without `gpu_memory_gb`; a `remote` CPU)."""
    if cuda:
        if gpu_memory_gb is not None:
            total = int(gpu_memory_gb * GB)
        elif torch.cuda.is_available() and not remote:
            index = torch.device(device).index if device.startswith("cuda") else None
            total = torch.cuda.get_device_properties(index or 0).total_memory
        else:
            return None
        return total, f"a {total / GB:.0f} GB GPU"  # Ray's fractional GPUs share its memory, they do not cap it
    if remote:
        return None
    from raycap.inputs import machine_memory_bytes

    total = machine_memory_bytes()
    return total, f"this machine's {total / GB:.0f} GB"


def learner_device_bytes(cfg, runtime: str) -> tuple[int, str] | None:
    """(bytes, what they are) a learner may use (`device_bytes`): a whole GPU when it runs on one, else this
    machine's memory; None when unknown (a learner on a cluster joined by address, without
    `runtime.gpu_memory_gb`)."""
    import os

    rt = cfg.runtime
    remote = runtime == "ray" and (rt.address is not None or bool(os.environ.get("RAY_ADDRESS")))
    on_gpu = rt.device.startswith("cuda") or (rt.device == "auto" and (
        rt.gpus_per_learner > 0 if runtime == "ray" else torch.cuda.is_available()))
    return device_bytes(on_gpu, rt.device, rt.gpu_memory_gb, remote)


def check_learner_fits(cfg, runtime: str) -> LearnerMemory | None:
    """A one-line UserError when the learner's estimate exceeds its device's memory; else the estimate."""
    est = learner_estimate(cfg, runtime)
    device = None if est is None else learner_device_bytes(cfg, runtime)
    if device is None or est.total_bytes <= device[0]:
        return est
    head = f"captioner {cfg.captioner.path}: one learner needs at least {est.total_bytes / GB:.1f} GB " \
           f"({est.breakdown()}) but has {device[1]}"
    if est.weights_bytes > device[0]:
        raise UserError(f"{head}: the weights alone do not fit; use a smaller captioner or a larger device")
    hints = [] if cfg.captioner.lora is not None else ["train LoRA adapters instead (captioner.lora.r)"]
    if runtime == "ray":
        hints.append("spread the gradients and Adam's moments over more learner ranks (runtime.zero_stage 2, "
                     "runtime.learner_workers)")
    raise UserError(f"{head}; " + ", or ".join(hints or ["train fewer parameters (rl.optimiser.train_lm false)"]))


def check_stage_fits(model, device_setting: str, gpu_memory_gb: float | None = None) -> LearnerMemory | None:
    """The supervised stage of a VLM (`model`: its `CaptionerModelConfig`, kind vlm) on `device_setting`: a
    one-line UserError when its weights, and the gradients and Adam moments of what trains, exceed the device's
    memory (a GPU's: `gpu_memory_gb`, else the device's; else this machine's); None when not checked (other kinds,
    whose models are small, or a model whose config cannot be read here: its loader says why)."""
    if model.kind != "vlm":
        return None
    try:
        parts = vlm_parts(model.vlm, model.train_projector)
    except Exception:  # not cached offline, or a config transformers cannot build: the loader's message follows
        return None
    est = estimate(parts, {"r": model.lora_r, "target_modules": None} if model.lora_r else None)
    est = dataclasses.replace(est, reference=0)  # the supervised stage has no KL reference
    cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
    device = device_bytes(cuda, device_setting, gpu_memory_gb)
    if device is not None and est.total_bytes > device[0]:
        hint = "; train LoRA adapters instead (model.lora_r)" if not model.lora_r and est.weights_bytes <= device[0] \
            else ""
        raise UserError(f"model.vlm {model.vlm}: the supervised stage needs at least {est.total_bytes / GB:.1f} GB "
                        f"({est.breakdown()}) but has {device[1]}{hint}")
    return est
