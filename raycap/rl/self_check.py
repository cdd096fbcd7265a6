"""Text-side self-check rewards: a caption should match its image better than its own word-swapped variants
(`self_check`) and better than the captions made by substituting one of its content words (`substitution_check`).

Swapping two words of a caption keeps its bag of words and changes what it binds: "a red square and a blue
circle" becomes "a blue square and a red circle". A retriever that scores a caption no higher than such
variants is not confirming the caption's bindings, so retrieval reward alone lets RL swap attributes between
objects. The self-check is the mean over the caption's variants v of

    log sigmoid( s * (cos(caption, image) - cos(v, image)) ) + log 2,

so a caption no better than its variants scores 0, one that beats each variant by a margin scores up to log 2
and one that loses below 0, *whatever its length*: a caption that beats each of its variants by the same
margin gets the same score however many variants it admits. (An earlier form, a log-softmax over the caption
and its n-1 variants plus log n, let a caption that beats its variants earn up to log n: longer captions, with
more variants, could earn more, up to log 64 = 4.2 against log 4 = 1.4 for a three-word caption.) It needs
only the frozen retriever, the image
embedding and the caption's text, so it runs on real images and captions as well as in the shapes world
(compare the swap negatives of ARO and SugarCrepe). Pure tensor and string code: the encoder is a callable.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Encoder = Callable[[Sequence[str]], torch.Tensor]


def word_swaps(caption: str, max_variants: int | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Distinct captions made by exchanging two different words of `caption` (never `caption` itself).
    With `max_variants`, a random subset of that many (drawn with `generator`), in a fixed order."""
    words = caption.split()
    seen, out = {" ".join(words)}, []
    for i, j in itertools.combinations(range(len(words)), 2):
        if words[i] == words[j]:
            continue
        v = words.copy()
        v[i], v[j] = v[j], v[i]
        text = " ".join(v)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if max_variants is not None and len(out) > max_variants:
        keep = torch.randperm(len(out), generator=generator)[:max_variants].sort().values
        out = [out[k] for k in keep.tolist()]
    return out


def word_substitutions(caption: str, classes: Sequence[Sequence[str]]) -> list[list[str]]:
    """For each word of `caption` that belongs to a word class, the captions made by replacing that one word with
    each other word of its classes (a word in several classes takes substitutes from all of them); words in no
    class are not content words and get no list. Classes are a plain word list the user gives (colours, shapes,
    sizes, ...): nothing here reads an image's truth."""
    subs: dict[str, list[str]] = {}
    for cls in classes:
        for w in cls:
            subs.setdefault(w, [])
            subs[w] += [v for v in cls if v != w and v not in subs[w]]
    words = caption.split()
    out = []
    for i, w in enumerate(words):
        if subs.get(w):
            out.append([" ".join(words[:i] + [v] + words[i + 1:]) for v in subs[w]])
    return out


def substitution_margins(captions: Sequence[str], image_emb: torch.Tensor, encode: Encoder, logit_scale: float,
                         classes: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """Per caption, a (K,) tensor with one entry per content word: `s * (cos(caption, image) - max_v cos(v, image))`
    over that word's single-word substitutes v (K = 0 for a caption without content words)."""
    groups = [word_substitutions(c, classes) for c in captions]
    texts = [t for c, g in zip(captions, groups) for t in [c, *(v for vs in g for v in vs)]]
    emb = encode(texts).float() if texts else image_emb.new_zeros(0, image_emb.shape[1])
    out, start = [], 0
    for g, img in zip(groups, image_emb.float()):
        n = 1 + sum(len(vs) for vs in g)
        logits = logit_scale * emb[start:start + n] @ img
        k, margins = 1, []
        for vs in g:
            margins.append(logits[0] - logits[k:k + len(vs)].max())
            k += len(vs)
        out.append(torch.stack(margins) if margins else logits.new_zeros(0))
        start += n
    return out


def substitution_score(margins: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) the substitution self-check from `substitution_margins`: the mean over content words of
    `log sigmoid(margin) + log 2`; no content word: 0."""
    return torch.stack([F.logsigmoid(m).mean() + math.log(2) if m.numel() else m.new_zeros(()) for m in margins])


def substitutions_passed(margins: Sequence[torch.Tensor], threshold: float = 0.0) -> torch.Tensor:
    """(N,) bool from `substitution_margins`: the caption has a content word and every content word beats each of
    its substitutes by more than `threshold` logits (every margin > threshold)."""
    return torch.tensor([bool(m.numel()) and bool((m > threshold).all()) for m in margins], dtype=torch.bool,
                        device=margins[0].device if margins else None)


def substitution_check(captions: Sequence[str], image_emb: torch.Tensor, encode: Encoder, logit_scale: float,
                       classes: Sequence[Sequence[str]]) -> torch.Tensor:
    """(N,) substitution self-check: each content word must beat its single-word substitutes under the frozen
    retriever. Per content word, the margin to its best substitute, `log sigmoid(s * (cos(caption, image) -
    max_v cos(v, image))) + log 2`; the caption's score is the mean over its content words. A word its image
    supports scores up to log 2, an undecided one 0, and a word whose substitute the image supports better (a
    green *circle* for a green star) loses the margin: one false word costs its caption that margin divided by its
    number of content words, however many substitutes the classes offer. No content word: 0."""
    return substitution_score(substitution_margins(captions, image_emb, encode, logit_scale, classes))


def self_check(captions: Sequence[str], image_emb: torch.Tensor, encode: Encoder, logit_scale: float,
               max_variants: int | None = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) self-check scores of N captions against their images' L2-normalised embeddings (N, D).
    A caption with no distinct variant (one word, or all words equal) scores 0."""
    groups = [[c] + word_swaps(c, max_variants, generator) for c in captions]
    texts = [t for g in groups for t in g]
    emb = encode(texts).float()
    out, start = [], 0
    for n, img in zip((len(g) for g in groups), image_emb.float()):
        logits = logit_scale * emb[start:start + n] @ img
        margin = logits[0] - logits[1:]
        out.append(F.logsigmoid(margin).mean() + math.log(2) if n > 1 else logits.new_zeros(()))
        start += n
    return torch.stack(out)
