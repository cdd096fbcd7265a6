"""Typed run config: named configs shipped in `raycap/configs/`, any YAML path, and `--set key=value`
overrides (dotted keys for nested fields). Every mistake is a one-line `UserError` naming the field."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from raycap.errors import UserError, format_validation_error

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).parent / "assets"
WORLD_DIR = ASSETS_DIR / "world-v2"  # the shipped world: its world.json, retriever/ and supervised captioner/
WORLD_V1_DIR = ASSETS_DIR / "world"  # world v1, kept for run dirs that name it (their config.json holds its path)


def is_loopback(host: str) -> bool:
    """Whether `host` names a loopback interface (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class RuntimeConfig(BaseModel):
    """Where the Ray runtime puts each role and how weights move (`raycap.runtime`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite: lr=.inf fails here

    rollout_workers: int = Field(1, ge=1, description="RolloutWorker actors (ignored when colocated)")
    learner_workers: int = Field(1, ge=1, description="DeepSpeed learner ranks")
    cpus_per_rollout: float = Field(0.5, gt=0)
    cpus_per_learner: float = Field(0.5, gt=0)
    cpus_per_reward: float = Field(0.25, gt=0)
    gpus_per_rollout: float = Field(0.0, ge=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    gpus_per_reward: float = Field(0.0, ge=0)
    weight_sync: Literal["object_store", "colocated", "nccl"] = "object_store"
    device: str = Field("auto", description="device of every role (rollouts, learner, reward service; the local "
                        "trainer): auto (the GPU Ray gave the actor, else the CPU; outside Ray cuda when "
                        "visible) or a torch device (cpu, cuda, cuda:N)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="compute precision of decoding, the "
                                                       "update, rewards and evaluation: auto (bf16 autocast on "
                                                       "CUDA, fp32 on CPU), fp32, or bf16 autocast (weights and "
                                                       "optimizer stay fp32)")
    collective_backend: Literal["nccl", "gloo"] = Field("nccl", description="backend of weight_sync=nccl "
                                                        "(gloo runs the same broadcast on CPU)")
    max_policy_lag: int = Field(0, ge=0, le=1, description="0: on-policy; 1: rollouts of t+1 overlap update t")
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage of the learner")
    max_restarts: int = Field(3, ge=0, description="restarts of a crashed rollout/reward actor")
    address: str | None = Field(None, description="Ray cluster to join ('auto'); None starts local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: this machine's)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (default: detected)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of each GPU a learner runs on, for the "
                                        "memory check before a run starts (default: the first visible CUDA "
                                        "device's; set it to plan a cluster's runs from a machine without one)")
    allow_public_dashboard: bool = Field(False, description="accept a non-loopback dashboard_host (trusted "
                                         "networks only: see ShadowRay, CVE-2023-48022)")
    dashboard_host: str = Field("127.0.0.1", description="interface of a local Ray's dashboard; a non-loopback "
                                "address exposes Ray's Jobs API (anyone reaching it can run code) and needs "
                                "allow_public_dashboard")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    placement_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for the placement group")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where the run's scalars, config and report go besides metrics.jsonl (raycap.tracking): "
                    "tensorboard (RUN/tensorboard), wandb (pip install 'raycap[wandb]'; its key and mode from the "
                    "environment: WANDB_API_KEY, WANDB_MODE=offline), mlflow (pip install 'raycap[mlflow]')")
    tracker_project: str = Field("raycap", description="the W&B project and MLflow experiment of the run (the "
                                 "tracker run is named after the run dir)")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server (http://host:5000) or file "
                                            "store (file:./mlruns, which MLflow 3 needs MLFLOW_ALLOW_FILE_STORE=true "
                                            "for: raycap sets it unless set); unset: MLFLOW_TRACKING_URI, else "
                                            "MLflow's default")

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|meta|cuda(:\d+)?", device):
            raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
        return device

    @field_validator("loggers", mode="before")
    @classmethod
    def _a_list(cls, loggers):
        return [x.strip() for x in loggers.split(",")] if isinstance(loggers, str) else loggers  # "tensorboard,wandb"

    @field_validator("loggers")
    @classmethod
    def _loggers_once(cls, loggers: list[str]) -> list[str]:
        twice = sorted({x for x in loggers if loggers.count(x) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} named more than once")
        return loggers

    @field_validator("tracker_project")
    @classmethod
    def _a_project_name(cls, name: str) -> str:
        bad = sorted(set(name) & set("/\\#?%:"))
        if not name.strip() or len(name) > 128 or bad:
            raise ValueError(f"{name!r}: a W&B project / MLflow experiment name needs 1-128 characters, none of "
                             "/ \\ # ? % :")
        return name

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _a_uri(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.strip():
            raise ValueError("empty; leave it unset for MLFLOW_TRACKING_URI or MLflow's default")
        return uri

    @field_validator("dashboard_host")
    @classmethod
    def _loopback_dashboard(cls, host: str, info: ValidationInfo) -> str:
        if not is_loopback(host) and not info.data.get("allow_public_dashboard"):
            raise ValueError(f"{host!r} is not a loopback address: it would expose Ray's dashboard and Jobs API, "
                             "which runs code for anyone who can reach it (ShadowRay, CVE-2023-48022); use "
                             "127.0.0.1, or set runtime.allow_public_dashboard: true on a trusted network")
        return host

    @model_validator(mode="after")
    def _collectives_fit_their_gpus(self):
        """NCCL needs a GPU per rank: refused here, not after the actors have started."""
        if self.weight_sync == "nccl" and self.collective_backend == "nccl":
            self._broadcast_ranks_own_their_gpus()
        g = self.gpus_per_learner
        if self.learner_workers > 1 and g > 0 and (g < 1 or g != int(g)):
            raise ValueError(f"gpus_per_learner {g:g} with {self.learner_workers} learner ranks: NCCL needs each "
                             "rank on its own GPU, so a whole number >= 1 (or learner_workers: 1)")
        return self

    def _broadcast_ranks_own_their_gpus(self) -> None:
        """NCCL weight broadcast: the learner and every rollout worker each on whole GPUs of their own."""
        if not (self.gpus_per_learner > 0 and self.gpus_per_rollout > 0):
            raise ValueError(f"weight_sync 'nccl' over collective_backend 'nccl' needs GPUs on the learner and the "
                             f"rollouts (gpus_per_learner {self.gpus_per_learner:g}, gpus_per_rollout "
                             f"{self.gpus_per_rollout:g}); on CPU use collective_backend: gloo or weight_sync: "
                             "object_store")
        split = {k: v for k in ("gpus_per_learner", "gpus_per_rollout") if (v := getattr(self, k)) != int(v)}
        if split:
            raise ValueError("weight_sync 'nccl' over collective_backend 'nccl' needs each rank on its own GPU, "
                             "so a whole number >= 1 of them (" + ", ".join(f"{k} {v:g}" for k, v in split.items())
                             + "): Ray would pack fractional ranks onto one GPU and NCCL fails at the first "
                             "broadcast; on one GPU use weight_sync: colocated")


SPLIT_ROLES = ("train", "val", "test")
DEFAULT_SPLITS = {"world": {"train": "train", "val": "val", "test": "test"},
                  "karpathy": {"train": ["train", "restval"], "val": "val", "test": "test"},
                  "folder": {"train": "train", "val": "val", "test": "test"}}


class DataConfig(BaseModel):
    """The images (and references) a run reads: the embedded world or a dataset on disk (`raycap.data`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["world", "karpathy", "coco", "cc", "nocaps", "folder"] = "world"
    path: str | None = Field(None, description="world: a pretrained world dir or its world.json (default: the "
                             "shipped world); karpathy: dataset_*.json; coco/nocaps/cc: the dir of the annotation "
                             "files (or one file); folder: the image folder")
    image_root: str | None = Field(None, description="where image paths start (default: next to path)")
    captions: str | None = Field(None, description="folder: an optional captions JSONL ({file, caption} lines)")
    splits: dict[Literal["train", "val", "test"], str | list[str]] | None = Field(
        None, description="train/val/test: split names (world, karpathy: e.g. [train, restval]), annotation or TSV "
        "files as FILE[:IMAGE_DIR] (coco, nocaps, cc) or subfolders (folder); defaults for world, karpathy, folder")
    on_bad_image: Literal["error", "skip"] = Field("error", description="a missing or corrupt image: stop with "
                                                    "its name, or leave it out (counted in the log and metrics)")
    train_images: int | None = Field(None, ge=2, description="use the first N train images (default: all)")

    @model_validator(mode="after")
    def _splits(self):
        if self.splits is None:
            if self.kind not in DEFAULT_SPLITS:
                raise ValueError(f"data.splits: kind {self.kind!r} has no default splits; name the annotation "
                                 "file of train, val and test (FILE[:IMAGE_DIR])")
            self.splits = dict(DEFAULT_SPLITS[self.kind])
        missing = [r for r in SPLIT_ROLES if r not in self.splits]
        if missing:
            raise ValueError(f"data.splits: missing {', '.join(missing)} (a run trains on train, evaluates on val "
                             "during the run and on test once)")
        if self.kind != "world" and self.path is None:
            raise ValueError(f"data.path: kind {self.kind!r} needs a path")
        return self


class RetrieverConfig(BaseModel):
    """The frozen CLIP judge: an open_clip name + pretrained tag or checkpoint file, or a model directory
    (a raycap retriever dir or an open_clip `open_clip_config.json` dir)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (openai) or a checkpoint file")
    path: str | None = Field(None, description="a raycap retriever dir or an open_clip model dir "
                             "(default: the shipped world retriever)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.name and self.path:
            raise ValueError("retriever: give either name (+ pretrained) or path, not both")
        if self.pretrained and not self.name:
            raise ValueError("retriever.pretrained needs retriever.name (the open_clip model it belongs to)")
        if not self.name and not self.path:
            self.path = str(WORLD_DIR / "retriever")
        return self


class LoraSettings(BaseModel):
    """LoRA adapters on the captioner's LM (`peft`): only they and the mapper are trained, saved and synced."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(32, ge=1, description="adapter rank")
    alpha: float = Field(64.0, gt=0, description="scale alpha / r of the adapter's update")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LM module names to adapt (default: peft's choice "
                                             "for the LM's architecture, e.g. GPT-2's c_attn)")


class CaptionerConfig(BaseModel):
    """The captioner RL starts from (and the frozen KL reference)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(str(WORLD_DIR / "captioner"), description="a raycap captioner dir")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters on the LM (with the mapper) instead "
                                      "of the whole LM; the run's captioners save merged")
    vision_features: Literal["auto", "cached", "per_batch"] = Field(
        "auto", description="a captioner with its own frozen vision tower (BLIP): cache its features of every "
        "image once (cached), or run the tower per batch on the role's device from the images (per_batch: "
        "memory for one batch at any dataset size); auto: cached when they fit in half the machine's memory")


class EvalConfig(BaseModel):
    """Evaluations: on the validation split every `every` updates, on the test split once at the end."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    every: int = Field(50, ge=1)
    images: int = Field(1000, ge=100, description="images per evaluation (P@1 ranks each among 100)")
    examples: int = Field(3, ge=0, description="captions logged beside their images' references")
    decoding: Literal["greedy", "beam", "select"] = Field(
        "greedy", description="decoding of the final test evaluation (the paper: beam 5; select: the best of "
        "select_samples sampled captions under the frozen retriever, raycap/rl/selection.py); validation "
        "evaluations decode greedily")
    num_beams: int = Field(5, ge=1)
    batch_size: int = Field(512, ge=1, description="sequences decoded (images x beams, or x select_samples) and "
                            "captions encoded at once in an evaluation: bounds its memory, not its captions")
    select_samples: int = Field(16, ge=2, description="select: sampled captions per image")
    select_cosine: float = Field(0.5, ge=0, description="select: weight of logit_scale * cos(caption, image)")
    select_check: float = Field(3.0, ge=0, description="select: weight of the substitution self-check (its word "
                                "classes: rl.self_check.substitution_classes)")
    report: bool = Field(True, description="write the HTML report (RUN/report/index.html) when the run ends")
    test_table: bool = Field(True, description="when the run ends, score the supervised and the fine-tuned "
                             "captioner on test with greedy decoding and with `decoding`, into final_metrics.json "
                             "(test_table) and the report, so RL's effect and the decoding's are seen apart")
    test_table_references: bool = Field(False, description="score each test-table row against the test split's "
                                        "references too: BLEU-4 and CIDEr (pycocoevalcap, needs Java), CLIPScore "
                                        "and RefCompare (the second method's claims are in these)")
    report_gallery: int = Field(24, ge=0, description="test images in the report's gallery")


def has_substitutes(classes: list[list[str]]) -> bool:
    """Some word class offers a substitute: the substitution self-check has something to compare."""
    return any(len(set(c)) >= 2 for c in classes)


class DistractorStage(BaseModel):
    """One stage of a distractor curriculum: for `updates` updates, `hard_distractors` of each target's candidates
    are its nearest training images past the `skip_nearest` nearest (random: 0 of them; medium: skip some; hard:
    skip none); the rest are random images of the batch."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    updates: int = Field(ge=1, description="updates this stage lasts (the last stage lasts to the run's end)")
    hard_distractors: int = Field(0, ge=0)
    skip_nearest: int = Field(0, ge=0, description="nearest images passed over before the hard distractors")


class RewardConfig(BaseModel):
    """What a rollout's caption is scored by (`raycap.rl.rewards`) and the candidates it is scored against."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["discriminative", "pool", "accuracy", "cosine"] = Field(
        "discriminative", description="discriminative: log softmax at the target over its candidates (the paper's); "
        "pool: the same over every training image (a false claim lets every image it fits win); accuracy; cosine")
    num_candidates: int = Field(100, ge=2, description="images each caption is retrieved among (the target and "
                                "its distractors)")
    hard_distractors: int = Field(0, ge=0, description="of the candidates, training images nearest the target")
    near_duplicate: float = Field(0.8, gt=0, le=1, description="hard distractors closer than this cosine to the "
                                  "target are skipped")
    cosine_coef: float = Field(0.0, ge=0, description="adds cosine_coef * logit_scale * cos(caption, target): an "
                               "absolute match term that, unlike the relative discriminative reward, charges "
                               "for claims that fit neither the target nor the distractors")
    phrase_coef: float = Field(0.0, ge=0, description="adds phrase_coef * the weakest phrase's discriminative "
                               "reward (each phrase of the caption, split at ' and ', scored alone against the same "
                               "candidates: rl/rewards.py phrase_grounding)")
    fluency_coef: float = Field(0.0, ge=0, description="adds fluency_coef * log P(fluent) of the fluency head "
                                "(`raycap pretrain fluency`: the retriever's text side against repeated, inserted "
                                "and shuffled words; Cho et al. 2022's grammar head)")
    fluency_head: str | None = Field(None, description="the fluency head's dir (`raycap pretrain fluency --out DIR`)")
    normalise_terms: bool = Field(False, description="standardise each reward term over the batch (mean 0, std 1) "
                                  "before the coefficients weight and sum them, so no term's scale drowns the others "
                                  "(BalCapRL)")
    curriculum: list[DistractorStage] = Field(
        default_factory=list, description="distractor stages in order, e.g. No Detail Left Behind's bags of random, "
        "then medium, then hard distractors (instead of hard_distractors throughout): a list of {updates, "
        "hard_distractors, skip_nearest}")

    def distractors_at(self, step: int) -> tuple[int, int]:
        """(hard distractors, nearest images skipped) for update `step` (0-based)."""
        end = 0
        for stage in self.curriculum:
            end += stage.updates
            if step < end:
                return stage.hard_distractors, stage.skip_nearest
        last = self.curriculum[-1] if self.curriculum else None
        return (last.hard_distractors, last.skip_nearest) if last else (self.hard_distractors, 0)


class SamplingConfig(BaseModel):
    """How the rollouts decode their captions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rollout: Literal["sample", "greedy"] = "sample"
    num_samples: int = Field(1, ge=1, description="sampled captions per image (loo and best need >= 2)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the trained policy is "
                               "softmax(logits / temperature): REINFORCE log-probs, KL guard and entropy read it")
    max_new_tokens: int = Field(40, ge=1, description="longest rollout caption, in tokens")


class AlgorithmConfig(BaseModel):
    """The update: the baseline of the policy gradient, its guards, and the Gumbel method's settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    baseline: Literal["none", "mean", "greedy", "loo", "best"] = Field(
        "mean", description="none | mean (running mean of past rewards) | greedy (self-critical) | loo (mean of "
        "the image's other samples) | best (advantage 1 for the image's best of num_samples captions, 0 for the "
        "rest: cross-entropy on the policy's own best caption)")
    baseline_momentum: float = Field(0.9, ge=0, lt=1)
    kl_coef: float = Field(0.1, ge=0)
    kl_estimator: Literal["full", "sampled"] = Field("full", description="full: exact KL over the vocabulary per "
                                                     "position; sampled: k2 on the sampled tokens (large vocabularies)")
    importance_ratio_cap: float = Field(2.0, ge=1, description="truncation of the sequence importance ratio "
                                        "pi/mu that reweights rollouts of an older policy (runtime.max_policy_lag=1)")
    entropy_coef: float = Field(0.0, ge=0)
    length_normalise: bool = Field(False, description="divide each caption's log-probability by its length")
    gumbel_tau: float = Field(1.0, gt=0)
    gumbel_loss: Literal["relevance", "discriminative"] = "relevance"


class OptimiserConfig(BaseModel):
    """What is trained and how fast."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(3e-4, gt=0)
    micro_batch: int | None = Field(None, ge=1, description="images (with all their samples) per teacher-forced "
                                    "pass of a DiscriTune update, gradients accumulated over the batch: bounds the "
                                    "update's memory, not its gradient; null (or >= the images of a learner "
                                    "rank): the whole batch")
    train_lm: bool = Field(True, description="train the language model too (false: the mapper or adapter only)")


class SelfCheckConfig(BaseModel):
    """The self-check reward (`raycap.rl.self_check`) and the word classes it and the test selection use."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coef: float = Field(0.0, ge=0, description="weight of the self-check reward")
    kind: Literal["swap", "substitute"] = Field("swap", description="swap: the caption against its word-swapped "
                                                "variants; substitute: each content word against its substitutes "
                                                "from substitution_classes")
    variants: int = Field(64, ge=1, description="word-swapped variants per caption in the swap self-check")
    substitution_classes: list[list[str]] = Field(default_factory=list, description="word classes of the "
                                                  "substitution self-check (e.g. the colour words, the shape words)")
    gate: bool = Field(False, description="verify before imitating: only a caption whose every content word beats "
                       "each of its substitutes from substitution_classes under the frozen retriever may get a "
                       "positive advantage (with baseline best: each image imitates its best verified caption, "
                       "none when no caption is verified)")
    gate_margin: float = Field(0.0, ge=0, description="the gate's margin: a content word passes when it beats each "
                               "substitute by more than this many logits (logit_scale * cosine) under the retriever")
    gate_penalty: float = Field(0.0, ge=0, description="the advantage of a caption that fails the gate is at most "
                                "-gate_penalty (with baseline best: exactly), so the policy unlearns what the "
                                "verifier rejects instead of only not imitating it")

    @model_validator(mode="after")
    def _gate_needs_classes(self):
        for key in ("gate_margin", "gate_penalty"):
            if getattr(self, key) and not self.gate:
                raise ValueError(f"self_check.{key} applies only with self_check.gate: true")
        if self.gate and not has_substitutes(self.substitution_classes):
            raise ValueError("self_check.gate needs self_check.substitution_classes: lists of words that may replace "
                             "each other, at least one with two words")
        return self


RL_SECTIONS = {"reward": RewardConfig, "sampling": SamplingConfig, "algorithm": AlgorithmConfig,
               "optimiser": OptimiserConfig, "self_check": SelfCheckConfig}
# The flat rl keys before the sections, and where each lives now (a fixed record: new settings are not here).
RL_MOVED = {
    "reward": "reward.kind", "num_candidates": "reward.num_candidates",
    "hard_distractors": "reward.hard_distractors", "near_duplicate": "reward.near_duplicate",
    "cosine_coef": "reward.cosine_coef", "phrase_coef": "reward.phrase_coef",
    "rollout": "sampling.rollout", "num_samples": "sampling.num_samples", "temperature": "sampling.temperature",
    "max_new_tokens": "sampling.max_new_tokens",
    "baseline": "algorithm.baseline", "baseline_momentum": "algorithm.baseline_momentum",
    "kl_coef": "algorithm.kl_coef", "kl_estimator": "algorithm.kl_estimator",
    "importance_ratio_cap": "algorithm.importance_ratio_cap", "entropy_coef": "algorithm.entropy_coef",
    "length_normalise": "algorithm.length_normalise", "gumbel_tau": "algorithm.gumbel_tau",
    "gumbel_loss": "algorithm.gumbel_loss",
    "lr": "optimiser.lr", "micro_batch": "optimiser.micro_batch", "train_lm": "optimiser.train_lm",
    "self_check_coef": "self_check.coef", "self_check_kind": "self_check.kind",
    "self_check_variants": "self_check.variants", "substitution_classes": "self_check.substitution_classes",
}


class RLConfig(BaseModel):
    """The algorithm: DiscriTune (REINFORCE on a retrieval reward) or Gumbel CLIP relevance; `steps` updates of
    `batch_size` images each, the rest in sections."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite (nan and inf refused)

    method: Literal["discritune", "gumbel"] = "discritune"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(100, ge=2)
    reward: RewardConfig = RewardConfig()
    sampling: SamplingConfig = SamplingConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimiser: OptimiserConfig = OptimiserConfig()
    self_check: SelfCheckConfig = SelfCheckConfig()

    @model_validator(mode="before")
    @classmethod
    def _refuse_flat_keys(cls, data):
        """A flat key of the config before the sections (`rl.kl_coef`) is refused with its new place."""
        if isinstance(data, dict):
            moved = [f"rl.{k} is now rl.{RL_MOVED[k]}" for k in data
                     if k in RL_MOVED and not (k == "reward" and isinstance(data[k], (dict, BaseModel)))]
            if moved:
                raise ValueError("; ".join(moved))
        return data

    @model_validator(mode="after")
    def _consistent(self):
        baseline, sampling, reward = self.algorithm.baseline, self.sampling, self.reward
        if baseline in ("loo", "best") and sampling.num_samples < 2:
            raise ValueError(f"algorithm.baseline '{baseline}' needs sampling.num_samples >= 2")
        if sampling.rollout == "greedy" and baseline in ("loo", "best", "greedy") and self.method == "discritune":
            raise ValueError(f"algorithm.baseline '{baseline}' with sampling.rollout 'greedy': an image's greedy "
                             "captions are all the same caption, so every advantage is 0; use sampling.rollout: "
                             "sample (or algorithm.baseline: mean)")
        if self.method == "gumbel" and (reward.fluency_coef or reward.normalise_terms):
            raise ValueError("reward.fluency_coef and reward.normalise_terms shape REINFORCE's reward; method gumbel "
                             "takes the relevance loss's gradient and reads neither")
        if reward.normalise_terms and self.algorithm.baseline == "greedy":
            raise ValueError("reward.normalise_terms with algorithm.baseline 'greedy': the greedy captions are scored "
                             "as a batch of their own, so their standardised rewards are on another scale than the "
                             "samples'; use baseline loo, best or mean")
        if reward.fluency_coef and not reward.fluency_head:
            raise ValueError("reward.fluency_coef needs reward.fluency_head: a dir `raycap pretrain fluency --out DIR` "
                             "writes")
        if reward.curriculum and sum(st.updates for st in reward.curriculum[:-1]) >= self.steps:
            raise ValueError(f"reward.curriculum: the stages before the last take "
                             f"{sum(st.updates for st in reward.curriculum[:-1])} updates, rl.steps is {self.steps}: "
                             "the last stage would never run")
        if reward.curriculum and reward.hard_distractors:
            raise ValueError("reward.curriculum sets the hard distractors of each stage: leave reward.hard_distractors "
                             "at 0")
        stages = [] if reward.curriculum else [("reward.hard_distractors", reward.hard_distractors)]
        stages += [
            (f"reward.curriculum[{i}].hard_distractors", stage.hard_distractors)
            for i, stage in enumerate(reward.curriculum)]
        for name, k in stages:
            if reward.num_candidates > self.batch_size + k:
                raise ValueError(f"reward.num_candidates ({reward.num_candidates}) exceeds batch_size + {name} "
                                 f"({self.batch_size} + {k})")
            if k >= reward.num_candidates:
                raise ValueError(f"{name} ({k}) must be < reward.num_candidates ({reward.num_candidates})")
        check = self.self_check
        if check.gate and self.method == "gumbel":
            raise ValueError("self_check.gate decides which captions DiscriTune may push up; method gumbel has no "
                             "advantages to gate (self_check.gate: false)")
        if check.kind == "substitute" and not has_substitutes(check.substitution_classes):
            raise ValueError("self_check.kind 'substitute' needs self_check.substitution_classes: lists of words "
                             "that may replace each other, at least one with two words")
        return self


class RunConfig(BaseModel):
    """One RL run: which images, which frozen retriever, which captioner, the algorithm, where it runs
    (`runtime`) and how it is evaluated. Sections are typed; `--set rl.algorithm.kl_coef=0.3` overrides one field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = 0
    setup: str | None = Field(None, description="what the config needs on disk and where to put it; said when "
                              "something it names is missing")
    checkpoint_every: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1, description="torch and OpenMP threads of every process, Ray actors "
                                "included (default: the local runtime uses all cores; each Ray actor its CPU "
                                "share rounded up, at least 1: raycap.runtime.resources.actor_threads)")
    data: DataConfig = DataConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    captioner: CaptionerConfig = CaptionerConfig()
    rl: RLConfig = RLConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.rl.batch_size % self.runtime.learner_workers:  # all samples of an image stay on one rank
            raise ValueError(f"runtime.learner_workers ({self.runtime.learner_workers}) must divide rl.batch_size "
                             f"({self.rl.batch_size}): each learner rank takes whole images with all their samples")
        per_rank = self.rl.batch_size // self.runtime.learner_workers
        micro = self.rl.optimiser.micro_batch
        if micro and micro < per_rank and per_rank % micro:
            raise ValueError(f"rl.optimiser.micro_batch ({micro}) must divide the images of a learner rank "
                             f"(rl.batch_size / runtime.learner_workers = {per_rank})")
        if micro and self.rl.method == "gumbel":
            raise ValueError("rl.optimiser.micro_batch splits DiscriTune's teacher-forced pass; rl.method gumbel "
                             "decodes the whole batch at once (rl.optimiser.micro_batch: null)")
        if self.runtime.max_policy_lag and self.rl.sampling.rollout != "sample":
            raise ValueError("runtime.max_policy_lag=1 needs rl.sampling.rollout: sample (the off-policy correction "
                             "reweights by the sampling distribution)")
        if self.captioner.lora is not None and not self.rl.optimiser.train_lm:
            raise ValueError("captioner.lora trains the LM through adapters: it needs rl.optimiser.train_lm: true "
                             "(or no captioner.lora)")
        needs_classes = self.eval.decoding == "select" and self.eval.select_check
        if needs_classes and not has_substitutes(self.rl.self_check.substitution_classes):
            raise ValueError("eval.decoding select with eval.select_check > 0 needs "
                             "rl.self_check.substitution_classes (the self-check's word classes), or "
                             "eval.select_check: 0")
        return self


def dotted_fields(data: dict, prefix: str = "", keep_empty: bool = False) -> dict:
    """A nested dict's leaves under dotted keys (`{"rl": {"steps": 1}}` -> `{"rl.steps": 1}`); an empty section is
    left out, or with `keep_empty` kept as the value `{}`."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and (v or not keep_empty):
            out |= dotted_fields(v, f"{prefix}{k}.", keep_empty)
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # an absent or null optional section (captioner.lora: null) starts empty
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = value


def section_model(annotation):
    """The section model of a field's annotation: `Model` or an optional `Model | None`; else the annotation."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return annotation


def check_override_key(key: str, model: type[BaseModel] | None = None) -> None:
    """A `--set KEY` must name a field of `model` (default RunConfig), dotted through its sections; otherwise a
    UserError naming `--set KEY` and listing the valid keys of that section."""
    model = model or RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = f"section {'.'.join(parts[:i])!r}" if i else "the top level"
            hint = moved_key_hint(part) if model is RunConfig else moved_rl_key_hint(part) if model is RLConfig else ""
            raise UserError(f"--set {key}: unknown key {part!r} in {where}{hint}; valid keys: {', '.join(fields)}")
        if i < len(parts) - 1:
            sub = section_model(fields[part].annotation)
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                raise UserError(f"--set {key}: {'.'.join(parts[:i + 1])!r} is a setting, not a section")
            model = sub


MOVED = {"world_dir": "data.path, retriever.path and captioner.path", "eval_every": "eval.every",
         "eval_images": "eval.images"}


def moved_rl_key_hint(key: str) -> str:
    """' (now rl.algorithm.kl_coef)' for a key of the flat rl section before its sub-sections, '' otherwise."""
    return f" (now rl.{RL_MOVED[key]})" if key in RL_MOVED else ""


def moved_key_hint(key: str) -> str:
    """' (now rl.algorithm.kl_coef)' for a key of the flat pre-sections config, '' otherwise."""
    if key in MOVED:
        return f" (now {MOVED[key]})"
    if key in RL_MOVED:
        return moved_rl_key_hint(key)
    for section in ("rl", "runtime", "data", "retriever", "captioner", "eval"):
        if key in RunConfig.model_fields[section].annotation.model_fields:
            return f" (now {section}.{key})"
    return ""


def yaml_error(e: yaml.YAMLError) -> str:
    """One line from a YAML error, keeping where it is: `line L, column C: problem (context at line ...)`."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    msg = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        msg += f" ({context}" + (f" at line {cmark.line + 1}, column {cmark.column + 1})" if cmark else ")")
    return msg


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding a key twice (PyYAML keeps the last one silently: a second
    `rl:` block would replace the first); merge keys (`<<`) still merge."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not (
                        node.start_mark.index <= key_node.start_mark.index < node.end_mark.index):
                    continue  # a merge, or a key merged in from an anchor elsewhere (flattened into this node)
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1}); a later one would "
                        "silently replace the earlier, so give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """`yaml.safe_load` with a duplicate key refused (`UniqueKeyLoader`): what raycap reads every YAML with."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass


def parse_overrides(pairs: list[str]) -> list[tuple[str, object]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out.append((key.strip(), load_yaml(value)))
        except yaml.YAMLError as e:
            raise UserError(f"--set {pair!r}: value is not valid YAML ({yaml_error(e)})") from None
    return out


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml_mapping(path: Path, allow_empty: bool = True) -> dict:
    """A config file's settings: YAML that is a mapping with each key once, or a one-line UserError. An empty
    file (or one of comments only) is {} when `allow_empty`, else refused."""
    try:
        data = load_yaml(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {yaml_error(e)}") from None
    if data is None or data == {}:
        if not allow_empty:
            raise UserError(f"{path}: the config is empty (no settings); a run config needs its settings, e.g. "
                            f"start from a copy of {CONFIG_DIR / 'world-demo.yaml'} or pass --config world-demo")
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of settings, not a {type(data).__name__}")
    return data


def load_config(name_or_path: str, overrides: list[str] = ()) -> RunConfig:
    """A named config (`world-demo`) or a YAML file, with `key=value` overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.is_file():  # a named config, even beside a dir of that name
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"unknown config {name_or_path!r}; named configs: {', '.join(named_configs())}, "
                            "or give a YAML path")
    data = read_yaml_mapping(path, allow_empty=False)  # an empty file would train on bare defaults
    for key in data:
        hint = moved_key_hint(str(key)) if key not in RunConfig.model_fields else ""
        if hint:
            raise UserError(f"{path}: {key!r} is no longer a top-level setting{hint}; configs have sections "
                            "data, retriever, captioner, rl, runtime, eval")
    import copy

    base = copy.deepcopy(data)  # the file's settings, before the overrides (to tell which --set broke a check)
    given, applied = {}, []  # key -> the --set as written; (key, value) in order
    for pair, (key, value) in zip(overrides, parse_overrides(list(overrides))):
        check_override_key(key)
        set_dotted(data, key, value)
        given[key] = pair.strip()
        applied.append((key, value))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        locs = {".".join(str(x) for x in err.get("loc", ())) for err in e.errors()}
        if locs and locs <= set(given):  # only overridden values are wrong: blame the --set, not the YAML file
            raise UserError("--set " + format_validation_error(e)) from None
        blamed = overrides_behind(e.errors(), given, base, applied)
        if blamed:  # a section's (or the run's) consistency check, broken by these --set values
            raise UserError(f"--set {' '.join(blamed)}: " + format_validation_error(e)) from None
        raise UserError(format_validation_error(e, str(path))) from None


def _error_key(err: dict) -> tuple:
    return tuple(err.get("loc", ())), err.get("msg")


def _fails_without(err: dict, key: str | set, base: dict, applied: list[tuple[str, object]]) -> bool:
    """Whether the config still fails with `err` when the `--set` of `key` (or of each key of a set) is left out
    (the others applied)."""
    import copy

    left_out = key if isinstance(key, set) else {key}
    data = copy.deepcopy(base)
    try:
        for k, value in applied:
            if k not in left_out:
                set_dotted(data, k, value)
        RunConfig.model_validate(data)
    except ValidationError as e:
        return _error_key(err) in {_error_key(x) for x in e.errors()}
    except UserError:
        return True
    return False


def overrides_behind(errors: list[dict], given: dict[str, str], base: dict | None = None,
                     applied: list[tuple[str, object]] = ()) -> list[str]:
    """The `--set` pairs behind these model-level errors (`rl`: a check across the rl section's fields, fed by
    an `--set rl.x`; `""`: across sections, fed by any `--set`), or [] when some error has none and so lies in
    the config file itself. Of the overrides that could feed a check, those involved are named: the ones whose
    field the error names (relative to the checked section, as the checks name them) and the ones without which
    the check passes (`--set rl.batch_size=8 --set rl.steps=5` breaking the candidates' check blames
    rl.batch_size alone); all of them when none is found so and the check passes without them all, none (the
    file) when it fails without them all."""
    import re

    blamed = set()
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        mine = {k for k in given if not loc or k.startswith(loc + ".")}
        if not mine:
            return []
        msg = str(err.get("msg", ""))
        named = {k for k in mine if re.search(r"(?<![\w.])" + re.escape(k[len(loc) + 1:] if loc else k) + r"(?!\w)",
                                              msg)}
        reverted = {k for k in mine - named if base is not None and not _fails_without(err, k, base, list(applied))}
        if not named | reverted and base is not None and _fails_without(err, mine, base, list(applied)):
            return []  # it fails without any of them: the config file's fault
        blamed |= (named | reverted) or mine
    return [given[k] for k in sorted(blamed)]
