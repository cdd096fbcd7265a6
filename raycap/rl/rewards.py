"""Rewards of DiscriTune and CLIP relevance, on L2-normalised embeddings (pure tensor code).

One scale: the retriever's logits, `logit_scale * cos` (CLIP's own; 100 for OpenAI CLIP, as CLIPScore's 100 cos).
- discriminative: log softmax over candidates of `logit_scale * cos(text, image_j)`, read at the target
  (column 0 of `candidates`): the paper's reward;
- pool: the same log softmax over *every* image of the pool (all the cached training images) instead of the
  step's candidates. Against 99 random distractors a guessed claim costs little (few of them share it); against
  the whole pool, every image the caption fits better than the target takes its share, so a false claim pays;
- accuracy: 1 if the target scores strictly above every distractor (a tie is a miss), else 0;
- cosine: `logit_scale * cos(text, target image)`, CLIPScore-like, no distractors (the `cosine_coef` term of
  the discriminative reward is this same quantity).

`REWARDS` is the registry of `rl.reward.kind`'s choices (name -> a `Reward`); a new reward is its function and its
entry there (and its name in `RewardConfig.kind`, which a test checks against the registry).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

Reward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(text_emb (N, D), image_emb (P, D) the pool, candidates (N, K) indices into it with the target in column 0,
logit_scale) -> (N,) rewards."""


def _fp32(fn):
    """Run `fn` with autocast off: the retriever's logits (and so rewards and log-softmaxes) are fp32 matmuls of
    fp32 embeddings even inside a bf16 role."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


@_fp32
def candidate_scores(text_emb: torch.Tensor, image_emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, K) cosines of each caption with its K candidate images (`candidates` index `image_emb`)."""
    return torch.einsum("nd,nkd->nk", text_emb.float(), image_emb.float()[candidates])


def discriminative(text_emb, image_emb, candidates, logit_scale) -> torch.Tensor:
    return torch.log_softmax(logit_scale * candidate_scores(text_emb, image_emb, candidates), dim=-1)[:, 0]


@_fp32
def pool(text_emb, image_emb, targets, logit_scale) -> torch.Tensor:
    """(N,) log softmax of `logit_scale * cos(text, image)` over all of `image_emb` (the pool), at `targets`."""
    logits = logit_scale * (text_emb.float() @ image_emb.float().T)
    rows = torch.arange(len(targets), device=logits.device)
    return torch.log_softmax(logits, dim=-1)[rows, targets.to(logits.device)]


def accuracy(text_emb, image_emb, candidates) -> torch.Tensor:
    s = candidate_scores(text_emb, image_emb, candidates)
    return (s[:, 0] > s[:, 1:].max(dim=1).values).float()


@_fp32
def cosine(text_emb, target_emb, logit_scale: float = 1.0) -> torch.Tensor:
    """`logit_scale * cos(text, target)` (raw cosine with the default scale 1)."""
    return logit_scale * (text_emb.float() * target_emb.float()).sum(-1)


REWARDS: dict[str, Reward] = {  # each called as (text_emb, image_emb, candidates, logit_scale)
    "discriminative": discriminative,
    "pool": lambda t, i, c, scale: pool(t, i, c[:, 0], scale),
    "accuracy": lambda t, i, c, scale: accuracy(t, i, c),
    "cosine": lambda t, i, c, scale: cosine(t, i[c[:, 0]], scale),
}


def compute(kind: str, text_emb, image_emb, candidates, logit_scale, batch: int | str = "?") -> torch.Tensor:
    """Reward of one kind (`REWARDS`) for N captions; targets are `candidates[:, 0]`. A non-finite reward raises."""
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; choose from {', '.join(REWARDS)}")
    r = REWARDS[kind](text_emb, image_emb, candidates, logit_scale)
    check_finite(r, batch)
    return r


def combine(terms: list[tuple[float, torch.Tensor]], normalise: bool = False) -> torch.Tensor:
    """The first term plus coef * each other term (the first one's coefficient is 1); with `normalise`, each term
    is first standardised over the batch (mean 0, std 1: BalCapRL's per-term normalisation, `standardise`), so the
    coefficients weigh terms of different scales as they read."""
    total = None
    for coef, term in terms:
        if normalise:
            term = standardise(term)
        total = term if total is None else total + coef * term
    return total


def standardise(term: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """(term - mean) / std over the batch; a term (nearly) constant over it, whose spread is below `rtol` of its
    size, carries no ranking and is only centred (0), so its rounding noise is never blown up to unit scale."""
    term = term.float()
    centred = term - term.mean()
    std = term.std(unbiased=False)
    spread = std > rtol * (term.abs().mean() + 1)  # a tensor: no host sync on a GPU
    return torch.where(spread, centred / torch.where(spread, std, torch.ones_like(std)), torch.zeros_like(centred))


def split_phrases(caption: str, separator: str = " and ") -> list[str]:
    """The caption's phrases, split at `separator` (a coordinating conjunction by default); empty parts dropped,
    the caption itself when there is nothing to split."""
    parts = [p.strip() for p in caption.split(separator)]
    parts = [p for p in parts if p]
    return parts or [caption]


def phrase_grounding(captions, encode, image_emb, candidates, logit_scale, separator: str = " and ") -> torch.Tensor:
    """(N,) the weakest phrase's discriminative reward: each phrase of a caption (split at `separator`) is scored
    on its own against the caption's candidates, and the caption gets the lowest. A phrase that is a guess (a
    second object the image does not have) retrieves other images and pulls its caption's term down, where the
    whole caption's reward lets a strong first phrase carry it. Captions and frozen embeddings only."""
    groups = [split_phrases(c, separator) for c in captions]
    emb = encode([p for g in groups for p in g])
    dev = candidates.device
    rows = torch.repeat_interleave(torch.arange(len(groups), device=dev),
                                   torch.tensor([len(g) for g in groups], device=dev))
    per_phrase = discriminative(emb, image_emb, candidates[rows], logit_scale).float()
    out = torch.full((len(groups),), float("inf"), device=per_phrase.device)
    return out.scatter_reduce(0, rows.to(per_phrase.device), per_phrase, reduce="amin")


def check_finite(rewards: torch.Tensor, batch: int | str) -> None:
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise FloatingPointError(f"non-finite reward in batch {batch} (rows {rows}): refusing to update")
