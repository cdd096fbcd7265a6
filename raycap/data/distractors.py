"""Distractors for the discriminative reward (pure tensor code).

Each target gets `num_candidates` images: itself (column 0), then `k_hard` hard distractors (its nearest
images by CLIP image cosine in the cached pool, skipping the target and near-duplicates with cosine above
`max_cos`, e.g. 0.8), then random others from its batch. The nearest-neighbour search is exact: chunked
matmul + top-k over the pool in torch, which for a batch of 100 queries is ~100 x M scores per step and stays
practical to about 1M pooled images (512-d, fp16: 1 GB of embeddings) on one GPU.
"""
from __future__ import annotations

import torch


def nearest(targets: torch.Tensor, pool: torch.Tensor, k: int, max_cos: float = 0.8,
            chunk: int = 262144, skip: int = 0) -> torch.Tensor:
    """(B, k) pool indices of each target's k most similar pool images with cosine <= max_cos, never the
    target itself, after the `skip` most similar of them (`targets` index `pool`, whose rows are L2-normalised);
    -1 where fewer qualify."""
    if k + skip > pool.shape[0] - 1:
        raise ValueError(f"asked for {k} hard distractors past the {skip} nearest from a pool of {pool.shape[0]} "
                         "images")
    if skip:
        return nearest(targets, pool, k + skip, max_cos, chunk)[:, skip:]
    targets = targets.to(pool.device)  # a batch's indices live on the CPU, a scorer's pool maybe on a GPU
    query = pool[targets]
    best_s = torch.full((len(targets), 0), float("-inf"), device=pool.device)
    best_i = torch.zeros((len(targets), 0), dtype=torch.long, device=pool.device)
    for start in range(0, pool.shape[0], chunk):
        s = (query @ pool[start:start + chunk].T).float()
        idx = torch.arange(start, start + s.shape[1], device=pool.device)
        s = s.masked_fill((s > max_cos) | (idx[None] == targets[:, None]), float("-inf"))
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, idx.expand(len(targets), -1)], 1)
        best_s, top = s.topk(min(k, s.shape[1]), dim=1)
        best_i = i.gather(1, top)
    return best_i.masked_fill(torch.isinf(best_s), -1)


def candidates(batch: torch.Tensor, pool: torch.Tensor | None = None, k_hard: int = 0, max_cos: float = 0.8,
               num_candidates: int | None = None, generator: torch.Generator | None = None,
               skip_nearest: int = 0) -> torch.Tensor:
    """(B, C) pool indices per target of a batch (`batch` holds pool indices): target first, then k_hard
    nearest neighbours (past the skip_nearest nearest), then random others from the batch (also standing in for
    hard distractors that the near-duplicate threshold left out). C defaults to B (the paper: batch 100 -> 99
    distractors). Every row has C distinct images: when the batch has too few others (C > B and some hard
    distractors were left out), the rest are drawn at random from the pool."""
    B = len(batch)
    C = num_candidates or B
    if C - 1 - k_hard > B - 1:
        raise ValueError(f"{C} candidates need {C - 1 - k_hard} random distractors but the batch has {B - 1} others")
    if pool is not None and C > len(pool):
        raise ValueError(f"{C} candidates asked from a pool of {len(pool)} images")
    # the search runs where the pool lives; the rows are built beside the batch's indices
    hard = (nearest(batch, pool, k_hard, max_cos, skip=skip_nearest).to(batch.device) if k_hard
            else batch.new_zeros((B, 0)))
    rows = []
    for b in range(B):
        found = hard[b][hard[b] >= 0]  # too few below the near-duplicate threshold: the rest are random
        others = torch.cat([batch[:b], batch[b + 1:]])
        others = others[~torch.isin(others, found)]
        pick = others[torch.randperm(len(others), generator=generator)[: C - 1 - len(found)].to(others.device)]
        row = torch.cat([batch[b:b + 1], found, pick])
        if len(row) < C:
            row = torch.cat([row, _fill(row, len(pool), C - len(row), generator)])
        rows.append(row)
    return torch.stack(rows)


def _fill(taken: torch.Tensor, pool_size: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n random pool indices not in `taken`."""
    free = torch.ones(pool_size, dtype=torch.bool)
    free[taken.cpu()] = False
    idx = free.nonzero().squeeze(1)
    return idx[torch.randperm(len(idx), generator=generator)[:n]].to(taken.device)
