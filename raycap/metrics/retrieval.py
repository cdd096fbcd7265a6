"""Retrieval metrics: P@1 among a fixed set of candidates per target, and attribute-binding accuracy."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def candidate_sets(n: int, k: int = 100, seed: int = 0) -> torch.Tensor:
    """(n, k) image indices: column 0 is the target i, the rest k-1 distinct random others (fixed seed)."""
    if n < k:
        raise ValueError(f"need at least {k} images for {k} candidates, got {n}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, k), np.int64)
    for i in range(n):
        others = rng.choice(n - 1, size=k - 1, replace=False)
        out[i, 0], out[i, 1:] = i, others + (others >= i)
    return torch.from_numpy(out)


def target_wins(text_emb: torch.Tensor, image_emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Bool (n,): the target scores strictly above every distractor (a tie is a miss)."""
    scores = torch.einsum("nd,nkd->nk", text_emb.float(), image_emb.float()[candidates])
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def p_at_1(text_emb: torch.Tensor, image_emb: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of targets ranked first by their text among their candidates."""
    return float(target_wins(text_emb, image_emb, candidates).float().mean())


@torch.no_grad()
def binding_accuracy(retriever, scenes: Sequence, image_emb: torch.Tensor, chunk: int = 2048) -> float:
    """Share of images with >= 2 objects whose true full description outscores every variant that
    exchanges one attribute between two of its objects."""
    from raycap.data.descriptions import binding_variants  # world-only

    texts, owner, sizes = [], [], []
    for i, scene in enumerate(scenes):
        variants = binding_variants(scene)
        if len(scene.objects) >= 2 and variants:
            texts += [scene.full_description, *variants]
            owner += [i] * (1 + len(variants))
            sizes.append(1 + len(variants))
    if not texts:
        return float("nan")
    emb = torch.cat([retriever.encode_captions(texts[k:k + chunk]) for k in range(0, len(texts), chunk)])
    scores = (emb * image_emb.to(emb)[torch.tensor(owner)]).sum(-1)
    wins = [bool(group[0] > group[1:].max()) for group in scores.split(sizes)]
    return float(np.mean(wins))
