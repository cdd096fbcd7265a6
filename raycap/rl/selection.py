"""Best-of-n caption selection by the frozen retriever (decoding `select`), pure tensor code.

Each image gets n sampled captions, and the one the retriever rates best is kept: its log softmax among the image
and a pool of other images (the run's training images: never the images being evaluated, whose 99 distractors
P@1 draws), plus `cosine_coef * logit_scale * cos(caption, image)` (an absolute match: a claim the image does not
support lowers it), plus `check_coef *` the substitution self-check (`raycap.rl.self_check`). The captioner
proposes what it believes, the retriever verifies: a guessed second object is kept only when the retriever
confirms it. Reads the images' embeddings, the captions and frozen models only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from raycap.config import RunConfig
from raycap.models.decoding import sampling_noise
from raycap.models.tokenizers import decode
from raycap.rl.self_check import substitution_check


@dataclass
class Selection:
    """The `select` decoding's settings; `decode` runs it (so the evaluation that decodes with it, in
    `raycap.supervised.captioner`, needs no import of rl/)."""

    samples: int = 16
    cosine_coef: float = 0.5
    check_coef: float = 3.0
    classes: Sequence[Sequence[str]] = field(default_factory=list)
    seed: int = 0
    chunk: int = 64  # images per seed block: each block's sampling noise comes from one generator seeded by its start

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Selection:
        """A run's settings: its `eval.select_*`, the self-check's word classes
        `rl.self_check.substitution_classes`, its seed."""
        e = cfg.eval
        return cls(samples=e.select_samples, cosine_coef=e.select_cosine, check_coef=e.select_check,
                   classes=cfg.rl.self_check.substitution_classes, seed=cfg.seed)

    def decode(self, captioner, tokenizer, inputs: torch.Tensor, image_emb: torch.Tensor, retriever,
               pool_emb: torch.Tensor, batch_size: int = 512) -> list[str]:
        """One caption per image, the best of `samples` (`select_captions`)."""
        return select_captions(captioner, tokenizer, inputs, image_emb, retriever, pool_emb, self, batch_size)


def selection_scores(texts: Sequence[str], text_emb: torch.Tensor, image_emb: torch.Tensor, pool_emb: torch.Tensor,
                     logit_scale: float, selection: Selection,
                     encode: Callable[[Sequence[str]], torch.Tensor]) -> torch.Tensor:
    """(N,) how well each caption picks out its own image: `text_emb` (N, D) of `texts`, `image_emb` (N, D) the
    image each caption is of, `pool_emb` (P, D) the other images it must beat."""
    own = logit_scale * (text_emb.float() * image_emb.float()).sum(-1)
    others = logit_scale * (text_emb.float() @ pool_emb.float().T)
    score = own - torch.logsumexp(torch.cat([own[:, None], others], dim=1), dim=1)
    if selection.cosine_coef:
        score = score + selection.cosine_coef * own
    if selection.check_coef:
        score = score + selection.check_coef * substitution_check(texts, image_emb, encode, logit_scale,
                                                                  selection.classes).to(score.device)
    return score


@torch.no_grad()
def select_captions(captioner, tokenizer, inputs: torch.Tensor, image_emb: torch.Tensor, retriever,
                    pool_emb: torch.Tensor, selection: Selection, batch_size: int = 512) -> list[str]:
    """One caption per image: the best of `selection.samples` samples under `selection_scores`. Each block of
    `selection.chunk` images draws its noise up front from a CPU generator seeded by the block's start (so a run's
    evaluation is reproducible, on any device), and its images are decoded and scored `batch_size // samples` at
    a time, with the same captions for any `batch_size`."""
    n, out = selection.samples, []
    device = next(captioner.parameters()).device
    pool_emb = pool_emb.to(retriever.logit_scale.device)
    scale = float(retriever.logit_scale)
    max_new = captioner.config.max_new_tokens
    step = max(1, batch_size // n)
    for k in range(0, len(image_emb), selection.chunk):
        block = min(selection.chunk, len(image_emb) - k)
        gen = torch.Generator().manual_seed(selection.seed * 1_000_003 + k)
        noise = sampling_noise(max_new, block * n, gen)
        for j in range(k, k + block, step):
            m = min(step, k + block - j)
            rows = slice((j - k) * n, (j - k + m) * n)
            caps = captioner.generate(inputs[j:j + m].to(device), mode="sample", num_samples=n,
                                      noise=noise[:, rows])
            texts = decode(tokenizer, caps.tokens, caps.lengths, captioner.stop_ids)
            img = image_emb[j:j + m].to(pool_emb.device).repeat_interleave(n, dim=0)
            scores = selection_scores(texts, retriever.encode_captions(texts), img, pool_emb, scale, selection,
                                      retriever.encode_captions)
            best = scores.view(-1, n).argmax(dim=1)
            out += [texts[i * n + int(b)] for i, b in enumerate(best)]
    return out
