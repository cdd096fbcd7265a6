"""REINFORCE baselines (pure tensor code). Each returns b with the shape of the rewards; advantages are R - b.

- none: b = 0;
- running mean of past rewards (exponential with `momentum`, or over a window of the last `window` batches),
  read before the batch's own rewards are added; the first batch, with no past, gets its own mean (a baseline
  of 0 would push every caption of the first updates down while discriminative rewards sit near -4);
- self-critical: the reward of the greedy caption of the same image;
- leave-one-out (RLOO, 'new self-critical'): n sampled captions per image, b_i = mean of the other n-1;
- best of n: b_i = R_i - [caption i is its image's best of n], so the advantage is 1 for each image's
  highest-reward caption and 0 for the others: the update is cross-entropy on the policy's own best caption
  (rejection-sampling fine-tuning, expert iteration). The reward only ranks an image's captions; a caption is
  never pushed down, and a guess that the reward sees through is simply not the one imitated.

`BASELINES` is the registry of `rl.algorithm.baseline`'s choices (name -> a function of the rewards and what a baseline
may read); a new baseline is its function and its entry there (and its name in `AlgorithmConfig.baseline`, which a test
checks against the registry).
"""
from __future__ import annotations

from collections import deque

import torch


class RunningMean:
    """Mean of past rewards; `momentum` (EMA) or `window` (mean of the last batches' means)."""

    def __init__(self, momentum: float | None = 0.9, window: int | None = None):
        if (momentum is None) == (window is None):
            raise ValueError("give exactly one of momentum or window")
        self.momentum, self.window = momentum, window
        self.value: float | None = None
        self._recent: deque[float] = deque(maxlen=window or 1)

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            self.update(rewards)
            return torch.full_like(rewards, self.value)
        b = torch.full_like(rewards, self.value)
        self.update(rewards)
        return b

    def update(self, rewards: torch.Tensor) -> None:
        m = float(rewards.float().mean())
        if self.window is not None:
            self._recent.append(m)
            self.value = sum(self._recent) / len(self._recent)
        else:
            self.value = m if self.value is None else self.momentum * self.value + (1 - self.momentum) * m

    def state_dict(self) -> dict:
        return {"value": self.value, "recent": list(self._recent)}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
        self._recent = deque(state["recent"], maxlen=self.window or 1)


def self_critical(greedy_rewards: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
    """Baseline of image-major samples: each image's greedy-caption reward, repeated per sample."""
    return greedy_rewards.repeat_interleave(num_samples)


def leave_one_out(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """b_i = mean reward of the other n-1 captions of the same image (rows image-major, n per image)."""
    if num_samples < 2:
        raise ValueError(f"leave-one-out needs >= 2 samples per image, got {num_samples}")
    if rewards.numel() % num_samples:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of {num_samples} samples per image")
    groups = rewards.view(-1, num_samples)
    return ((groups.sum(1, keepdim=True) - groups) / (num_samples - 1)).reshape(rewards.shape)


def best_of_n(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """b_i = R_i - 1 for the first highest-reward caption of each image, R_i for the others (rows image-major, n
    per image): advantages are that one-hot."""
    if num_samples < 2:
        raise ValueError(f"best of n needs >= 2 samples per image, got {num_samples}")
    if rewards.numel() % num_samples:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of {num_samples} samples per image")
    groups = rewards.view(-1, num_samples)
    best = torch.zeros_like(groups).scatter_(1, groups.argmax(dim=1, keepdim=True), 1.0)
    return (groups - best).reshape(rewards.shape)


def best_of_verified(rewards: torch.Tensor, verified: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Advantages (not a baseline) of the `best` baseline behind a verifier: 1 for the first highest-reward
    caption among each image's verified captions, 0 for every other caption (and for every caption of an image
    with none verified)."""
    groups = rewards.view(-1, num_samples).float().masked_fill(~verified.view(-1, num_samples), float("-inf"))
    best = torch.zeros_like(groups).scatter_(1, groups.argmax(dim=1, keepdim=True), 1.0)
    best *= verified.view(-1, num_samples).any(dim=1, keepdim=True)
    return best.reshape(rewards.shape).to(rewards.dtype)


def _greedy(rewards: torch.Tensor, *, greedy: torch.Tensor | None, num_samples: int, **_) -> torch.Tensor:
    if greedy is None:
        raise ValueError("the greedy (self-critical) baseline needs the greedy captions' rewards")
    return self_critical(greedy, num_samples)


BASELINES = {  # name -> baseline(rewards, *, running, greedy, num_samples): b, the shape of the rewards
    "none": lambda rewards, **_: torch.zeros_like(rewards),
    "mean": lambda rewards, *, running, **_: running(rewards),
    "greedy": _greedy,
    "loo": lambda rewards, *, num_samples, **_: leave_one_out(rewards, num_samples),
    "best": lambda rewards, *, num_samples, **_: best_of_n(rewards, num_samples),
}


def compute(kind: str, rewards: torch.Tensor, *, running: RunningMean | None = None,
            greedy: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
    """The baseline of one kind (`BASELINES`) for N rewards: `running` is the running mean ("mean" updates it),
    `greedy` the greedy captions' rewards per image ("greedy"), `num_samples` the samples per image."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[kind](rewards, running=running, greedy=greedy, num_samples=num_samples)
