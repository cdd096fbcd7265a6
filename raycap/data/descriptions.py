"""Descriptions for training and testing the world retriever: partial descriptions, attribute-swapped hard
negatives (NegCLIP-style), the binding test's variants, and which description is true of which image.

Descriptions are tuples of `Mention` (None = attribute left out) so truth can be computed for a whole batch
at once; `render` turns them into text the grammar parses back to the same mentions.
"""
from __future__ import annotations

from itertools import permutations

import numpy as np

from raycap.data.grammar import Mention, analyse
from raycap.data.world import ATTRIBUTES, Scene, WorldConfig, article, position_word

Description = tuple[Mention, ...]


def render(desc: Description) -> str:
    def one(m: Mention) -> str:
        words = [w for w in (m.size, m.colour) if w] + [m.shape or "shape"]
        text = f"{article(words[0])} {' '.join(words)}"
        return f"{text} at {m.position}" if m.position else text
    return " and ".join(one(m) for m in desc)


def full(scene: Scene) -> Description:
    return tuple(Mention(o.shape, o.colour, o.size, o.position(scene.grid)) for o in scene.objects)


def partial(scene: Scene, rng: np.random.Generator, p_drop: float = 0.35, p_drop_position: float = 0.5) -> Description:
    """Some of the scene's objects (grid order kept), each with some attributes left out."""
    k = int(rng.integers(1, len(scene.objects) + 1))
    chosen = sorted(rng.choice(len(scene.objects), size=k, replace=False).tolist())
    out = []
    for m in (full(scene)[i] for i in chosen):
        keep = {a: rng.random() >= (p_drop_position if a == "position" else p_drop) for a in ATTRIBUTES}
        out.append(Mention(**{a: getattr(m, a) if keep[a] else None for a in ATTRIBUTES}))
    return tuple(out)


def dropped(desc: Description) -> list[Description]:
    """The description with one stated attribute of one mention left out, each way: true wherever `desc` is, and
    less specific."""
    out = []
    for i, m in enumerate(desc):
        for a in ATTRIBUTES:
            if getattr(m, a) is not None:
                out.append(tuple(Mention(**{**m.__dict__, a: None}) if k == i else o for k, o in enumerate(desc)))
    return out


def is_true(desc: Description, scene: Scene) -> bool:
    return analyse(render(desc), scene).faithful


def _swap(desc: Description, i: int, j: int, attr: str) -> Description:
    a, b = desc[i], desc[j]
    out = list(desc)
    out[i] = Mention(**{**a.__dict__, attr: getattr(b, attr)})
    out[j] = Mention(**{**b.__dict__, attr: getattr(a, attr)})
    return tuple(out)


def negatives(desc: Description, scene: Scene, config: WorldConfig, rng: np.random.Generator, n: int) -> list[Description]:
    """Up to `n` false variants of a description: an attribute exchanged between two mentioned objects
    (binding), or one attribute changed. Each is checked false of the scene."""
    values = {"shape": config.shapes, "colour": config.colours, "size": ["small", "large"],
              "position": sorted({position_word(r, c, config.grid) for r in range(config.grid) for c in range(config.grid)})}
    out, tries = [], 0
    while len(out) < n and tries < 8 * n:
        tries += 1
        if len(desc) >= 2 and rng.random() < 0.6:
            i, j = rng.choice(len(desc), size=2, replace=False).tolist()
            attr = ATTRIBUTES[rng.integers(3)]  # shape, colour or size
            if getattr(desc[i], attr) is None or getattr(desc[j], attr) is None:
                continue
            cand = _swap(desc, i, j, attr)
        else:
            i = int(rng.integers(len(desc)))
            stated = [a for a in ATTRIBUTES if getattr(desc[i], a) is not None]
            if not stated:
                continue
            attr = stated[rng.integers(len(stated))]
            others = [v for v in values[attr] if v != getattr(desc[i], attr)]
            cand = tuple(Mention(**{**m.__dict__, attr: others[rng.integers(len(others))]}) if k == i else m
                         for k, m in enumerate(desc))
        if cand != desc and cand not in out and not is_true(cand, scene):
            out.append(cand)
    return out


def binding_variants(scene: Scene) -> list[str]:
    """The full description with one attribute (shape, colour or size) exchanged between two objects."""
    desc, out = full(scene), []
    for i in range(len(desc)):
        for j in range(i + 1, len(desc)):
            for attr in ("shape", "colour", "size"):
                if getattr(desc[i], attr) != getattr(desc[j], attr):
                    out.append(render(_swap(desc, i, j, attr)))
    return out


class TruthTable:
    """Vectorised 'is description t true of scene s' for batches (<= 3 objects and mentions)."""

    def __init__(self, config: WorldConfig):
        self.grid = config.grid
        self.index = {"shape": {v: i for i, v in enumerate(config.shapes)},
                      "colour": {v: i for i, v in enumerate(config.colours)},
                      "size": {"small": 0, "large": 1},
                      "position": {position_word(r, c, config.grid): r * config.grid + c
                                   for r in range(config.grid) for c in range(config.grid)}}
        self.slots = config.max_objects

    def scenes(self, scenes: list[Scene]) -> np.ndarray:
        out = np.full((len(scenes), self.slots, 4), -3, np.int64)  # -3: no object (matches nothing)
        for s, scene in enumerate(scenes):
            for o, obj in enumerate(scene.objects):
                out[s, o] = [self.index[a][obj.attr(a, scene.grid)] for a in ATTRIBUTES]
        return out

    def descriptions(self, descs: list[Description]) -> tuple[np.ndarray, np.ndarray]:
        """Attribute ids (-1 unstated) and which mention slots are used."""
        ids = np.full((len(descs), self.slots, 4), -1, np.int64)
        used = np.zeros((len(descs), self.slots), bool)
        for t, desc in enumerate(descs):
            if len(desc) > self.slots:
                raise ValueError(f"description with {len(desc)} mentions exceeds {self.slots} slots")
            for m, mention in enumerate(desc):
                used[t, m] = True
                ids[t, m] = [-1 if getattr(mention, a) is None else self.index[a][getattr(mention, a)] for a in ATTRIBUTES]
        return ids, used

    def __call__(self, descs: list[Description], scenes: list[Scene] | np.ndarray) -> np.ndarray:
        """Bool (T, S): every mention bound to a distinct object with all its stated attributes."""
        ids, used = self.descriptions(descs)
        objs = scenes if isinstance(scenes, np.ndarray) else self.scenes(scenes)
        ok = (ids[:, None, :, None, :] == -1) | (ids[:, None, :, None, :] == objs[None, :, None, :, :])
        match = ok.all(-1) & (objs[None, :, None, :, 0] >= 0)  # (T, S, mention, object)
        truth = np.zeros((len(descs), len(objs)), bool)
        for perm in permutations(range(self.slots)):
            hit = np.ones_like(truth)
            for m, o in enumerate(perm):
                hit &= ~used[:, None, m] | match[:, :, m, o]
            truth |= hit
        return truth
