"""Training the fluency model (`raycap.models.fluency`): a copy of the retriever's text tower and a head, fine-tuned
together with binary cross-entropy; each reference is a positive, its repeated, inserted and shuffled versions are
negatives (weighted to count as much as the references); a held-out tenth of the references measures it (accuracy
on references and on each kind of corruption)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from raycap.models.fluency import FluencyModel, corruptions

KINDS = ("repeated", "inserted", "shuffled")


def labelled_texts(references: list[str], vocabulary: list[str], rng: np.random.Generator, known: set[str]):
    """(texts, labels, kinds): each reference (label 1, kind 'reference') and those of its corruptions that are not
    themselves one of the `known` references (label 0, their kind): an inserted 'large' can make another true,
    more detailed reference, which must not be taught as broken."""
    texts, labels, kinds = [], [], []
    for ref in references:
        texts.append(ref), labels.append(1.0), kinds.append("reference")
        for kind, bad in zip(KINDS, corruptions(ref, rng, vocabulary)):
            if bad not in known:
                texts.append(bad), labels.append(0.0), kinds.append(kind)
    return texts, torch.tensor(labels), np.array(kinds)


def train_fluency_model(retriever, references: list[str], vocabulary: list[str], steps: int = 1000,
                        batch_size: int = 128, lr: float = 3e-4, seed: int = 0) -> tuple[FluencyModel, dict]:
    """A fluency model trained on 90% of the distinct references (and their corruptions, drawn afresh each step),
    measured on the other 10%. `retriever` is copied, never changed."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    known = set(r for r in references if r.strip())
    refs = sorted(known)
    if len(refs) < 10:
        raise ValueError(f"the fluency model needs at least 10 distinct references, got {len(refs)}")
    refs = [refs[i] for i in rng.permutation(len(refs))]
    cut = max(1, len(refs) // 10)
    held, train = refs[:cut], refs[cut:]
    text = copy.deepcopy(retriever).train()
    text.requires_grad_(True)
    model = FluencyModel(text)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        batch = [train[i] for i in rng.integers(len(train), size=min(batch_size, len(train)))]
        x, y, _ = labelled_texts(batch, vocabulary, rng, known)
        weight = torch.where(y == 1, (y == 0).sum() / (y == 1).sum().clamp(min=1), 1.0)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, weight=weight / weight.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    hx, hy, hkinds = labelled_texts(held, vocabulary, rng, known)
    with torch.no_grad():
        right = ((model(hx) > 0).float() == hy).numpy()
    metrics = {"references": len(refs), "held_out": len(held), "train_loss": round(loss.item(), 4)}
    metrics |= {f"held_out_accuracy_{k}": round(float(right[hkinds == k].mean()), 4)
                for k in ("reference", *KINDS) if (hkinds == k).any()}
    return model, metrics
