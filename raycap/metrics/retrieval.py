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


def hard_candidate_sets(image_emb: torch.Tensor, k_hard: int, k: int = 100, seed: int = 0,
                        max_cos: float = 0.8) -> torch.Tensor:
    """(n, k) like `candidate_sets` (same seed, same random distractors in the same order), with the first k-1-h
    random distractors kept and the target's h nearest images by image cosine in front of them (h = k_hard, fewer
    where fewer have cosine <= max_cos: near-duplicates are skipped as in training); the row stays k distinct
    images."""
    from raycap.data.distractors import nearest

    n = len(image_emb)
    base = candidate_sets(n, k, seed)
    if not k_hard:
        return base
    if not 0 < k_hard < k:
        raise ValueError(f"{k_hard} hard distractors among {k} candidates")
    hard = nearest(torch.arange(n), image_emb.float(), k_hard, max_cos)
    rows = []
    for i in range(n):
        found = hard[i][hard[i] >= 0]
        rest = base[i, 1:][~torch.isin(base[i, 1:], found)][: k - 1 - len(found)]
        rows.append(torch.cat([base[i, :1], found, rest]))
    return torch.stack(rows)


def target_wins(text_emb: torch.Tensor, image_emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Bool (n,): the target scores strictly above every distractor (a tie is a miss)."""
    scores = torch.einsum("nd,nkd->nk", text_emb.float(), image_emb.float()[candidates])
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def target_ranks(text_emb: torch.Tensor, image_emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Long (n,): the target's rank among its candidates, 1 + the distractors scoring at least as high (so rank
    1 is exactly a `target_wins` win)."""
    scores = torch.einsum("nd,nkd->nk", text_emb.float(), image_emb.float()[candidates])
    return 1 + (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


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
