"""The one place that builds a role's models on its device and precision: the policy (the captioner RL trains,
with LoRA adapters when `captioner.lora` says so), its frozen reference (the KL guard) and the frozen retriever.
The reference loop, the learner ranks, the rollout workers and the reward service all build theirs here, so
every copy of a policy has the same trainable set (which weight movement addresses) and the same adapters."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from raycap.config import RunConfig
from raycap.errors import UserError
from raycap.inputs import load_captioner, load_retriever
from raycap.models import lora, precision


@dataclass
class RoleModels:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype of the role's forward passes (None: fp32)
    policy: torch.nn.Module
    tokenizer: object
    reference: torch.nn.Module | None = None
    retriever: object | None = None

    def autocast(self):
        """The context every forward pass of this role runs in (bf16 autocast, or nothing)."""
        return precision.autocast(self.device, self.dtype)


def add_configured_lora(policy, cfg: RunConfig) -> None:
    """Adapters on the policy's LM as `captioner.lora` says (seeded by the run's seed), or nothing."""
    settings = cfg.captioner.lora
    if settings is None:
        return
    target = getattr(policy, "lora_target", None)
    if target is None:
        raise UserError(f"captioner.lora: the captioner at {cfg.captioner.path} ({type(policy).__name__}) names no "
                        "module to adapt")
    targets = settings.target_modules or lora.default_targets(target, getattr(policy, "lora_fallback_targets", None))
    lora.add_lora(target, settings.r, settings.alpha, settings.dropout, targets, seed=cfg.seed)


def build_role_models(cfg: RunConfig, device, reference: bool = False, retriever: bool = False) -> RoleModels:
    """The policy (and, if asked, its frozen reference and the frozen retriever) of one role, on `device`, with
    the run's decode length and trainable set; the reference is the captioner as loaded, without adapters."""
    device = torch.device(device)
    policy, tokenizer = load_captioner(cfg.captioner.path)
    policy.config.max_new_tokens = cfg.rl.sampling.max_new_tokens
    ref = copy.deepcopy(policy).eval().requires_grad_(False).to(device) if reference else None
    add_configured_lora(policy, cfg)
    policy.set_trainable(cfg.rl.optimiser.train_lm)
    policy.to(device)
    ret = load_retriever(cfg.retriever).to(device) if retriever else None
    return RoleModels(device, precision.compute_dtype(cfg.runtime.precision, device), policy, tokenizer, ref, ret)


def train_scorer(models: RoleModels, train, cfg: RunConfig):
    """The scorer of a role that draws batches and rewards them: the retriever and the train split's embeddings
    (and what the captioner reads of them, when not those) on the role's device."""
    from raycap.rl.algorithm import Scorer

    inputs = train.inputs.to(models.device) if isinstance(train.inputs, torch.Tensor) else train.inputs  # ImageRows
    fluency = None
    if cfg.rl.reward.fluency_coef:
        from raycap.models.fluency import FluencyModel

        fluency = FluencyModel.from_pretrained(cfg.rl.reward.fluency_head).to(models.device)
    return Scorer(models.retriever, train.embeddings.to(models.device), models.tokenizer, models.policy.stop_ids,
                  cfg, inputs=inputs, fluency=fluency)


def optimizer(policy: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters at the run's constant lr (fused kernels on CUDA)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.Adam(params, lr=cfg.rl.optimiser.lr, **({"fused": True} if fused else {}))
