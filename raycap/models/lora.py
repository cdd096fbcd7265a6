"""LoRA adapters on a captioner's language model, through `peft`: added in place (the module keeps its own class
and forward), marked as the only trainable LM weights, and merged away when a captioner is saved, so a LoRA run's
captioners are plain captioner directories."""
from __future__ import annotations

import copy

import torch
from torch import nn

from raycap.errors import UserError

LORA_MARK = "lora_"  # peft's parameter names: ...lora_A.default.weight, ...lora_B.default.weight


def _lora_layer_class():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def default_targets(lm: nn.Module, fallback: list[str] | None = None) -> list[str]:
    """peft's LoRA target modules for the LM's architecture (GPT-2: c_attn; LLaMA: q_proj, v_proj); for an
    architecture peft does not know, `fallback` (the captioner's `lora_fallback_targets`), else one line."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    kind = getattr(getattr(lm, "config", None), "model_type", None)
    if kind not in targets and fallback:
        return list(fallback)
    if kind not in targets:
        raise UserError(f"captioner.lora: peft has no default target modules for LM type {kind!r}: set "
                        "captioner.lora.target_modules (names of its linear layers)")
    return list(targets[kind])


def add_lora(lm: nn.Module, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None,
             seed: int = 0) -> nn.Module:
    """Add rank-`r` adapters to `lm`'s target modules in place and return it. The adapters start as a no-op
    (peft's B = 0); their A matrices are drawn from `seed`, so every copy of a policy (learner ranks, rollout
    workers, a resumed run) gets the same ones without touching the global random stream."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_modules or default_targets(lm)
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in lm.named_modules() if n.split(".")[-1] in targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=conv1d, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, lm)
        except ValueError as e:
            raise UserError(f"captioner.lora.target_modules {targets}: {str(e).splitlines()[0]}") from None
    return lm


def has_lora(module: nn.Module) -> bool:
    """Whether `module` holds adapters (read from its parameter names: peft is not imported for plain models)."""
    return any(LORA_MARK in n for n, _ in module.named_parameters())


def mark_trainable(module: nn.Module) -> None:
    """Only the adapters of `module` train; its own weights are frozen."""
    for name, p in module.named_parameters():
        p.requires_grad_(LORA_MARK in name)


@torch.no_grad()
def merged(module: nn.Module) -> nn.Module:
    """A copy of `module` with every adapter merged into its base weight and the adapter layers replaced by
    their base layers: the plain architecture, loadable without peft."""
    layer = _lora_layer_class()
    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, layer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, m.get_base_layer())
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA run: the adapters and the mapper), detached CPU copies by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `trainable_state`'s tensors back into `model`'s parameters of those names."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"weights for unknown parameters: {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
