"""Typed run config: named configs shipped in `raycap/configs/`, any YAML path, and `--set key=value`
overrides (dotted keys for nested fields). Every mistake is a one-line `UserError` naming the field."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycap.errors import UserError, format_validation_error

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).parent / "assets"


class RuntimeConfig(BaseModel):
    """Where the Ray runtime puts each role and how weights move (`raycap.runtime`)."""

    model_config = ConfigDict(extra="forbid")

    rollout_workers: int = Field(1, ge=1, description="RolloutWorker actors (ignored when colocated)")
    learner_workers: int = Field(1, ge=1, description="DeepSpeed learner ranks")
    cpus_per_rollout: float = Field(0.5, gt=0)
    cpus_per_learner: float = Field(0.5, gt=0)
    cpus_per_reward: float = Field(0.25, gt=0)
    gpus_per_rollout: float = Field(0.0, ge=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    gpus_per_reward: float = Field(0.0, ge=0)
    weight_sync: Literal["object_store", "colocated", "nccl"] = "object_store"
    collective_backend: Literal["nccl", "gloo"] = Field("nccl", description="backend of weight_sync=nccl "
                                                        "(gloo runs the same broadcast on CPU)")
    max_policy_lag: int = Field(0, ge=0, le=1, description="0: on-policy; 1: rollouts of t+1 overlap update t")
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage of the learner")
    max_restarts: int = Field(3, ge=0, description="restarts of a crashed rollout/reward actor")
    address: str | None = Field(None, description="Ray cluster to join ('auto'); None starts local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: this machine's)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (default: detected)")
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    placement_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for the placement group")


class RLConfig(BaseModel):
    """One RL run (DiscriTune or Gumbel CLIP relevance) on the shapes world."""

    model_config = ConfigDict(extra="forbid")

    world_dir: str = Field(str(ASSETS_DIR / "world"), description="pretrained world: world.json, retriever/, captioner/")
    method: Literal["discritune", "gumbel"] = "discritune"
    reward: Literal["discriminative", "accuracy", "cosine"] = "discriminative"
    baseline: Literal["none", "mean", "greedy", "loo"] = "mean"
    baseline_momentum: float = Field(0.9, ge=0, lt=1)
    num_samples: int = Field(1, ge=1, description="sampled captions per image (loo needs >= 2)")
    rollout: Literal["sample", "greedy"] = "sample"
    temperature: float = Field(1.0, gt=0)
    kl_coef: float = Field(0.1, ge=0)
    kl_estimator: Literal["full", "sampled"] = "full"
    entropy_coef: float = Field(0.0, ge=0)
    cosine_coef: float = Field(0.0, ge=0, description="adds cosine_coef * logit_scale * cos(caption, target): an "
                               "absolute match term that, unlike the relative discriminative reward, charges "
                               "for claims that fit neither the target nor the distractors")
    self_check_coef: float = Field(0.0, ge=0, description="weight of the word-swap self-check reward (rl/self_check.py)")
    self_check_variants: int = Field(64, ge=1, description="word-swapped variants per caption in the self-check")
    length_normalise: bool = False
    batch_size: int = Field(100, ge=2)
    num_candidates: int = Field(100, ge=2)
    hard_distractors: int = Field(0, ge=0)
    near_duplicate: float = Field(0.8, gt=0, le=1)
    lr: float = Field(3e-4, gt=0)
    steps: int = Field(300, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    train_lm: bool = True
    gumbel_tau: float = Field(1.0, gt=0)
    gumbel_loss: Literal["relevance", "discriminative"] = "relevance"
    eval_every: int = Field(50, ge=1)
    eval_images: int = Field(1000, ge=100)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads of each process (default: all cores; "
                                "Ray actors too, whose OMP_NUM_THREADS Ray would otherwise set to their CPU share)")
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.baseline == "loo" and self.num_samples < 2:
            raise ValueError("baseline 'loo' needs num_samples >= 2")
        if self.num_candidates > self.batch_size + self.hard_distractors:
            raise ValueError(f"num_candidates ({self.num_candidates}) exceeds batch_size + hard_distractors")
        rows = self.batch_size * (1 if self.method == "gumbel" else self.num_samples)
        if rows % self.runtime.learner_workers:
            raise ValueError(f"runtime.learner_workers ({self.runtime.learner_workers}) must divide the "
                             f"{rows} captions of a batch")
        if self.hard_distractors >= self.num_candidates:
            raise ValueError("hard_distractors must be < num_candidates")
        return self


def set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, object]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError:
            raise UserError(f"--set {pair!r}: value is not valid YAML") from None
    return out


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] = ()) -> RLConfig:
    """A named config (`world-demo`) or a YAML file, with `key=value` overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"unknown config {name_or_path!r}; named configs: {', '.join(named_configs())}, "
                            "or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of settings")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(data, key, value)
    try:
        return RLConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None
