"""The shapes world's caption grammar and the caption-quality checks built on it.

    caption  := generic | mention ("and" mention)*
    mention  := article [size] [colour] noun ["at" position]      article agrees: "an orange", "a red"
    noun     := a shape name | "shape"

`parse` turns a caption into claims (one `Mention` per object named, None for an unstated attribute) or
None when the caption is not in the grammar. The checks compare claims with a scene: each mention is bound
to a distinct object by an optimal assignment, so an attribute only counts as true on the object it is
bound to (swapping colours between two objects is caught).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from raycap.data.world import (
    ATTRIBUTES,
    GENERIC_CAPTIONS,
    PALETTE,
    ROW_WORDS,
    SHAPES,
    SIZES,
    Scene,
    article,
    position_word,
)

POSITIONS = sorted({position_word(r, c, g) for g in ROW_WORDS for r in range(g) for c in range(g)},
                   key=lambda p: -len(p.split()))  # try two-word positions first


@dataclass(frozen=True)
class Mention:
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def claims(self) -> list[tuple[str, str]]:
        return [(a, getattr(self, a)) for a in ATTRIBUTES if getattr(self, a) is not None]


def parse(caption: str) -> tuple[Mention, ...] | None:
    """Claims of a caption, () for a generic caption, None if it is not in the grammar."""
    words = caption.strip().split()
    if words and words[-1] == ".":
        words = words[:-1]
    if " ".join(words) in GENERIC_CAPTIONS:
        return ()
    mentions, i = [], 0
    while True:
        m, i = _mention(words, i)
        if m is None:
            return None
        mentions.append(m)
        if i == len(words):
            return tuple(mentions)
        if words[i] != "and":
            return None
        i += 1


def _mention(words: list[str], i: int) -> tuple[Mention | None, int]:
    if i >= len(words) or words[i] not in ("a", "an") or i + 1 >= len(words):
        return None, i
    if words[i] != article(words[i + 1]):
        return None, i
    i += 1
    size = colour = None
    if words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in PALETTE:
        colour, i = words[i], i + 1
    if i >= len(words) or (words[i] not in SHAPES and words[i] != "shape"):
        return None, i
    shape, i = (None if words[i] == "shape" else words[i]), i + 1
    position = None
    if i < len(words) and words[i] == "at":
        for p in POSITIONS:
            n = len(p.split())
            if words[i + 1:i + 1 + n] == p.split():
                position, i = p, i + 1 + n
                break
        else:
            return None, i
    return Mention(shape, colour, size, position), i


@dataclass(frozen=True)
class CaptionReport:
    """How one caption relates to its image."""
    wellformed: bool
    n_mentions: int
    n_claims: int
    n_true: int          # claims true of the object their mention is bound to
    n_facts: int         # attributes of the image's objects (4 per object)
    faithful: bool       # well-formed and every claim true under one binding of mentions to distinct objects
    repetition: bool


def _true_claims(m: Mention, scene: Scene, obj) -> int:
    return sum(obj.attr(a, scene.grid) == v for a, v in m.claims())


def bind(mentions: Sequence[Mention], scene: Scene) -> int:
    """Most claims that can be true when each mention names a distinct object (Hungarian assignment)."""
    if not mentions:
        return 0
    score = np.array([[_true_claims(m, scene, o) for o in scene.objects] for m in mentions])
    rows, cols = linear_sum_assignment(score, maximize=True)
    return int(score[rows, cols].sum())


def repeats_trigram(words: Sequence[str]) -> bool:
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def analyse(caption: str, scene: Scene) -> CaptionReport:
    mentions = parse(caption)
    n_facts = len(ATTRIBUTES) * len(scene.objects)
    if mentions is None:
        segments = " ".join(caption.split()).split(" and ")
        return CaptionReport(False, 0, 0, 0, n_facts, False, any(repeats_trigram(s.split()) for s in segments))
    n_claims = sum(len(m.claims()) for m in mentions)
    n_true = bind(mentions, scene)
    faithful = n_true == n_claims and len(mentions) <= len(scene.objects)
    repetition = len(set(mentions)) != len(mentions)
    return CaptionReport(True, len(mentions), n_claims, n_true, n_facts, faithful, repetition)


def _reports(captions: Sequence[str], scenes: Sequence[Scene]) -> list[CaptionReport]:
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    return [analyse(c, s) for c, s in zip(captions, scenes)]


def wellformed(captions: Sequence[str]) -> float:
    """Share of captions the grammar parses completely."""
    return float(np.mean([parse(c) is not None for c in captions]))


def faithful(captions, scenes) -> float:
    """Share of captions whose every claim is true, each attribute bound to the right object."""
    return float(np.mean([r.faithful for r in _reports(captions, scenes)]))


def precision(captions, scenes) -> float:
    """Share of all claims (over well-formed captions) that are true of their bound object."""
    reports = _reports(captions, scenes)
    claims = sum(r.n_claims for r in reports)
    return float(sum(r.n_true for r in reports) / claims) if claims else float("nan")


def recall(captions, scenes) -> float:
    """Share of the images' object attributes (shape, colour, size, position) that captions state truly."""
    reports = _reports(captions, scenes)
    return float(sum(r.n_true for r in reports) / sum(r.n_facts for r in reports))


def multi_object(captions: Sequence[str]) -> float:
    """Share of captions that name two or more objects."""
    return float(np.mean([(m := parse(c)) is not None and len(m) >= 2 for c in captions]))


def repetition(captions, scenes) -> float:
    """Share of captions that state an object twice or repeat a word trigram."""
    return float(np.mean([r.repetition for r in _reports(captions, scenes)]))


def caption_checks(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """All checks in one pass."""
    reports = _reports(captions, scenes)
    claims = sum(r.n_claims for r in reports)
    return {
        "wellformed": float(np.mean([r.wellformed for r in reports])),
        "faithful": float(np.mean([r.faithful for r in reports])),
        "precision": float(sum(r.n_true for r in reports) / claims) if claims else float("nan"),
        "recall": float(sum(r.n_true for r in reports) / sum(r.n_facts for r in reports)),
        "multi_object": float(np.mean([r.n_mentions >= 2 for r in reports])),
        "repetition": float(np.mean([r.repetition for r in reports])),
    }
