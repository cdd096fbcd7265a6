"""The captioner protocol: what the RL code, both runtimes and evaluation ask of a captioner (ClipCap today;
BLIP implements the same), and the pieces every implementation shares.

A captioner reads frozen image embeddings (the retriever's, or its own vision tower's, cached), decodes captions
as token ids of its own tokenizer (greedy, sampled with a seeded CPU generator, beam) with per-token log-probs,
scores given tokens by teacher forcing, says which parameters RL trains, and saves to / loads from a directory.
Captions travel as token ids; the reward side decodes them with the captioner's tokenizer and the retriever
re-tokenizes the text with its own. The kinds of captioner (a directory's kind, how it loads) are registered in
`raycap.models.loading`, above the implementations, so that this protocol imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log-softmax of (N, T, V) logits read at the (N, T) tokens (fp32)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)


@dataclass
class Captions:
    """Decoded captions. `tokens`/`logprobs` are (N, T), padded after `lengths` (which count the stop token)."""

    tokens: Tensor
    lengths: Tensor
    logprobs: Tensor

    def tolist(self) -> list[list[int]]:
        """Token ids per caption, trimmed to its length (stop token included if produced)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


@runtime_checkable
class Captioner(Protocol):
    """What raycap calls on a captioner. `config` has at least `clip_dim` (the width of the image embeddings it
    reads), `max_new_tokens` and `pad_token_id`; `stop_ids` are the token ids that end a caption."""

    config: object
    stop_ids: list[int]

    def generate(self, image_embeds: Tensor, mode: str = "greedy", temperature: float = 1.0, num_beams: int = 5,
                 max_new_tokens: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, num_samples: int = 1,
                 noise: Tensor | None = None) -> Captions: ...

    def logits(self, image_embeds: Tensor, tokens: Tensor) -> Tensor: ...

    def log_probs(self, image_embeds: Tensor, tokens: Tensor, lengths: Tensor, reduction: str = "none") -> Tensor: ...

    def set_trainable(self, train_lm: bool) -> None: ...

    def save_pretrained(self, path) -> None: ...

    # Optional. `soft_decoding = True` with `soft_start(inputs) -> (logits (N, V), cache)` and
    # `soft_step(probs (N, V), cache) -> (logits, cache)` (soft tokens fed as their input embeddings): the Gumbel
    # method decodes through them (ClipCap, VLMs). `lora_fallback_targets`: LoRA's target modules when peft has no
    # default for the LM's type (VLMs).
