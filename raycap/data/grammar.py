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
    spans = _parse_spans(caption.strip().split())
    return None if spans is None else tuple(m for m, _ in spans)


def _parse_spans(words: list[str]) -> list[tuple[Mention, int]] | None:
    """Each mention with the index of its first word in `words`; [] for a generic caption, None if not in the
    grammar."""
    if words and words[-1] == ".":
        words = words[:-1]
    if " ".join(words) in GENERIC_CAPTIONS:
        return []
    mentions, i = [], 0
    while True:
        start = i
        m, i = _mention(words, i)
        if m is None:
            return None
        mentions.append((m, start))
        if i == len(words):
            return mentions
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
    n_objects: int = 0   # objects in the scene
    first_true: bool | None = None  # every claim of the first mention true of its bound object (None: no mention)


def _true_claims(m: Mention, scene: Scene, obj) -> int:
    return sum(obj.attr(a, scene.grid) == v for a, v in m.claims())


def bind(mentions: Sequence[Mention], scene: Scene) -> int:
    """Most claims that can be true when each mention names a distinct object (Hungarian assignment)."""
    return _true_under(mentions, scene, binding(mentions, scene))


def _true_under(mentions: Sequence[Mention], scene: Scene, bound: Sequence[int | None]) -> int:
    """Claims true of the objects `bound` gives the mentions (a mention bound to None: all its claims false)."""
    return sum(_true_claims(m, scene, scene.objects[o]) for m, o in zip(mentions, bound) if o is not None)


def binding(mentions: Sequence[Mention], scene: Scene) -> list[int | None]:
    """The object each mention is bound to by `bind`'s assignment (None: more mentions than objects)."""
    if not mentions:
        return []
    score = np.array([[_true_claims(m, scene, o) for o in scene.objects] for m in mentions])
    rows, cols = linear_sum_assignment(score, maximize=True)
    bound: list[int | None] = [None] * len(mentions)
    for r, c in zip(rows, cols):
        bound[r] = int(c)
    return bound


def word_verdicts(caption: str, scene: Scene) -> list[tuple[str, str]]:
    """The caption's words, each with a verdict: "true" or "false" for a word that states an attribute (judged
    on the object its mention is bound to, as `analyse` binds them; every claim of a mention left without an
    object is false), "" for the other words of a well-formed caption, "unparsed" for every word of a caption
    outside the grammar. For showing a caption with its false claims marked."""
    words = caption.strip().split()
    spans = _parse_spans(words)
    if spans is None:
        return [(w, "unparsed") for w in words]
    verdicts = [""] * len(words)
    bound = binding([m for m, _ in spans], scene)
    for (m, start), obj in zip(spans, bound):
        k = start + 1  # after the article
        for attr in ("size", "colour", "shape"):
            value = getattr(m, attr)
            if attr == "shape" or value is not None:  # the noun is always there ("shape" claims nothing)
                if value is not None:
                    true = obj is not None and scene.objects[obj].attr(attr, scene.grid) == value
                    verdicts[k] = "true" if true else "false"
                k += 1
        if m.position is not None:
            true = obj is not None and scene.objects[obj].attr("position", scene.grid) == m.position
            for j in range(k + 1, k + 1 + len(m.position.split())):  # the words after "at"
                verdicts[j] = "true" if true else "false"
    return list(zip(words, verdicts))


def repeats_trigram(words: Sequence[str]) -> bool:
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def analyse(caption: str, scene: Scene) -> CaptionReport:
    mentions = parse(caption)
    n_facts = len(ATTRIBUTES) * len(scene.objects)
    n_objects = len(scene.objects)
    if mentions is None:
        segments = " ".join(caption.split()).split(" and ")
        return CaptionReport(False, 0, 0, 0, n_facts, False, any(repeats_trigram(s.split()) for s in segments),
                             n_objects)
    n_claims = sum(len(m.claims()) for m in mentions)
    bound = binding(mentions, scene)
    n_true = _true_under(mentions, scene, bound)
    faithful = n_true == n_claims and len(mentions) <= n_objects
    repetition = len(set(mentions)) != len(mentions)
    first = None
    if mentions:
        first = bound[0] is not None and _true_claims(mentions[0], scene, scene.objects[bound[0]]) == len(
            mentions[0].claims())
    return CaptionReport(True, len(mentions), n_claims, n_true, n_facts, faithful, repetition, n_objects, first)


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
    """All checks in one pass, with faithfulness by the scene's number of objects (`faithful_<k>obj`), claims per
    well-formed caption and the first mention's faithfulness (over captions naming an object): saying less must
    not pass for lying less."""
    reports = _reports(captions, scenes)
    claims = sum(r.n_claims for r in reports)
    parsed = [r for r in reports if r.wellformed]
    firsts = [r.first_true for r in reports if r.first_true is not None]
    by_count = {k: [r.faithful for r in reports if r.n_objects == k] for k in sorted({r.n_objects for r in reports})}
    return {f"faithful_{k}obj": float(np.mean(v)) for k, v in by_count.items()} | {
        "claims_per_caption": float(np.mean([r.n_claims for r in parsed])) if parsed else float("nan"),
        "first_mention_faithful": float(np.mean(firsts)) if firsts else float("nan"),
        "wellformed": float(np.mean([r.wellformed for r in reports])),
        "faithful": float(np.mean([r.faithful for r in reports])),
        "precision": float(sum(r.n_true for r in reports) / claims) if claims else float("nan"),
        "recall": float(sum(r.n_true for r in reports) / sum(r.n_facts for r in reports)),
        "multi_object": float(np.mean([r.n_mentions >= 2 for r in reports])),
        "repetition": float(np.mean([r.repetition for r in reports])),
    }
