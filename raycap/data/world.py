"""The shapes world: procedural images of 1-3 objects with full descriptions and vague references.

Everything is deterministic from (seed, split, index). Scenes are the ground truth the caption grammar
(`raycap.data.grammar`) judges captions against; they are the judge, never a training signal for RL.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycap.errors import UserError, format_validation_error

PALETTE = {
    "red": (220, 40, 40), "green": (40, 185, 60), "blue": (50, 90, 235), "yellow": (235, 220, 50),
    "orange": (245, 140, 25), "purple": (150, 60, 205), "white": (240, 240, 240), "cyan": (40, 215, 220),
    "pink": (250, 130, 190), "brown": (140, 85, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring")
SIZES = ("small", "large")
ROW_WORDS = {2: ("top", "bottom"), 3: ("top", None, "bottom")}
COL_WORDS = {2: ("left", "right"), 3: ("left", None, "right")}
GENERIC_CAPTIONS = ("some shapes", "a few shapes", "a picture of shapes")
ATTRIBUTES = ("shape", "colour", "size", "position")
SPLITS = {"train": 0, "val": 1, "test": 2}
REF_DROP = {"size": 0.5, "colour": 0.35, "shape": 0.2, "position": 0.8}  # the references' vagueness
LATER_FIELDS = ("shape_scale", "ref_drop")  # WorldConfig fields added after worlds and caches were made
BACKGROUND = (18, 18, 24)


def position_word(row: int, col: int, grid: int) -> str:
    """'top left', 'top', 'center', ... for a cell of a 2x2 or 3x3 grid."""
    r, c = ROW_WORDS[grid][row], COL_WORDS[grid][col]
    return " ".join(w for w in (r, c) if w) or "center"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class WorldConfig(BaseModel):
    """What the world looks like and how big its splits are. Every field is validated."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite

    version: Literal[1, 2] = Field(1, description="the world's recipe: 1 (the first shipped world, raycap/assets/world: "
                                   "the retriever's loss masks other texts true of an image), 2 (the shipped world, "
                                   "raycap/assets/world-v2: CLIP's loss, every other pair of a batch a negative, so "
                                   "specific true texts score above vague ones). A world.json without it is 1")
    seed: int = 0
    image_size: int = Field(48, ge=16, le=512)
    grid: Literal[2, 3] = 3
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES[:6]), min_length=2)
    colours: list[str] = Field(default_factory=lambda: list(PALETTE)[:8], min_length=2)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1)
    jitter: int = Field(2, ge=0)
    shape_scale: float = Field(1.0, gt=0, le=1.5, description="objects' drawn radius as a multiple of the standard "
                               "one (large 0.44, small 0.26 of a grid cell)")
    noise: float = Field(6.0, ge=0)
    refs_per_image: int = Field(5, ge=1)
    generic_ref_share: float = Field(0.10, ge=0, le=1)
    two_object_ref_share: float = Field(0.22, ge=0, le=1)
    salient_ref_share: float = Field(0.8, ge=0, le=1)
    ref_drop: dict[str, float] = Field(default_factory=lambda: dict(REF_DROP), description="each attribute's "
                                       "chance of being left out of a reference's mention (shape says 'shape'); "
                                       "attributes left out of the dict keep these defaults")
    n_train: int = Field(40000, ge=1)
    labelled_fraction: float = Field(0.02, gt=0, le=1)
    n_val: int = Field(1000, ge=1)
    n_test: int = Field(1000, ge=1)

    @field_validator("shapes", "colours")
    @classmethod
    def _known_and_distinct(cls, v, info):
        known = SHAPES if info.field_name == "shapes" else tuple(PALETTE)
        unknown = [x for x in v if x not in known]
        if unknown:
            raise ValueError(f"unknown {info.field_name[:-1]} {unknown[0]!r}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} must be distinct")
        return v

    @field_validator("ref_drop")
    @classmethod
    def _drop_chances(cls, v):
        unknown = [k for k in v if k not in REF_DROP]
        if unknown:
            raise ValueError(f"unknown attribute {unknown[0]!r}; known: {', '.join(REF_DROP)}")
        bad = [k for k, p in v.items() if not 0 <= p <= 1]
        if bad:
            raise ValueError(f"{bad[0]}: a chance between 0 and 1, not {v[bad[0]]}")
        return REF_DROP | v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_objects < self.min_objects:
            raise ValueError(f"max_objects ({self.max_objects}) < min_objects ({self.min_objects})")
        if self.max_objects > self.grid ** 2:
            raise ValueError(f"max_objects ({self.max_objects}) exceeds the {self.grid}x{self.grid} grid's cells")
        if self.generic_ref_share + self.two_object_ref_share > 1:
            raise ValueError("generic_ref_share + two_object_ref_share must be <= 1")
        return self

    @classmethod
    def parse(cls, data: dict | None, source: str = "world") -> "WorldConfig":
        """Validate a dict; a bad value raises UserError naming the field."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise UserError(format_validation_error(e, source)) from None

    def identity(self) -> dict:
        """The settings as JSON values, without the fields added after the first worlds shipped (`LATER_FIELDS`)
        where they hold their defaults: what keys a world's caches and exports, so those made before still match."""
        data = json.loads(self.model_dump_json())
        for name in LATER_FIELDS:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                data.pop(name)
        return data

    @property
    def n_labelled(self) -> int:
        return max(1, int(round(self.n_train * self.labelled_fraction)))

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "labelled": self.n_labelled, "val": self.n_val, "test": self.n_test}[split]

    def vocabulary(self) -> list[str]:
        """Every word the world's captions can use (the grammar's vocabulary)."""
        words = {"a", "an", "and", "at", "center", "shape", "of"}
        words |= {w for g in GENERIC_CAPTIONS for w in g.split()}
        words |= set(SHAPES) | set(PALETTE) | set(SIZES)
        words |= {w for d in (ROW_WORDS, COL_WORDS) for ws in d.values() for w in ws if w}
        return sorted(words)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    def position(self, grid: int) -> str:
        return position_word(self.row, self.col, grid)

    def attr(self, name: str, grid: int) -> str:
        return self.position(grid) if name == "position" else getattr(self, name)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # row-major order of grid cells
    grid: int = 3

    def describe(self, objects=None, drop: frozenset = frozenset()) -> str:
        """'a large green star at top left and a small red circle at bottom'; `drop` omits attributes
        ('shape' says 'shape' instead of the noun)."""
        return " and ".join(mention(o, self.grid, drop) for o in (self.objects if objects is None else objects))

    @property
    def full_description(self) -> str:
        return self.describe()

    def salient(self) -> Obj:
        """The most salient object: large before small, then a fixed colour order, then grid order."""
        colour_rank = {c: i for i, c in enumerate(PALETTE)}
        return min(self.objects, key=lambda o: (o.size != "large", colour_rank[o.colour], o.row, o.col))


def mention(o: Obj, grid: int, drop: frozenset = frozenset()) -> str:
    words = [w for a, w in (("size", o.size), ("colour", o.colour)) if a not in drop]
    words.append("shape" if "shape" in drop else o.shape)
    phrase = f"{article(words[0])} {' '.join(words)}"
    return phrase if "position" in drop else f"{phrase} at {o.position(grid)}"


class World:
    """Scenes, images and references of one world config. `split` is train/labelled/val/test;
    the labelled split is the first `n_labelled` images of train."""

    def __init__(self, config: WorldConfig | dict | None = None):
        self.config = config if isinstance(config, WorldConfig) else WorldConfig.parse(config)

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        split_id = SPLITS["train" if split == "labelled" else split]
        return np.random.default_rng([self.config.seed, split_id, index, stream])

    def _check(self, split: str, index: int):
        n = self.config.split_size(split)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for split {split!r} of size {n}")

    # -- scenes -------------------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        self._check(split, index)
        c = self.config
        rng = self._rng(split, index, 0)
        n = int(rng.integers(c.min_objects, c.max_objects + 1))
        cells = sorted(rng.choice(c.grid * c.grid, size=n, replace=False).tolist())
        objs = []
        for cell in cells:
            objs.append(Obj(
                shape=c.shapes[rng.integers(len(c.shapes))], colour=c.colours[rng.integers(len(c.colours))],
                size=SIZES[rng.integers(2)], row=cell // c.grid, col=cell % c.grid,
                dx=int(rng.integers(-c.jitter, c.jitter + 1)), dy=int(rng.integers(-c.jitter, c.jitter + 1))))
        return Scene(tuple(objs), c.grid)

    def scenes(self, split: str) -> list[Scene]:
        return [self.scene(split, i) for i in range(self.config.split_size(split))]

    # -- pixels -------------------------------------------------------------------------------------
    @cached_property
    def _coords(self):
        s = self.config.image_size
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        return y, x

    def image(self, split: str, index: int) -> np.ndarray:
        """uint8 RGB array (H, W, 3)."""
        scene = self.scene(split, index)
        c = self.config
        rng = self._rng(split, index, 1)
        s, cell = c.image_size, c.image_size / c.grid
        img = np.empty((s, s, 3), np.float32)
        img[:] = BACKGROUND
        y, x = self._coords
        for o in scene.objects:
            radius = cell * (0.44 if o.size == "large" else 0.26) * c.shape_scale
            cy, cx = (o.row + 0.5) * cell + o.dy, (o.col + 0.5) * cell + o.dx
            mask = shape_mask(o.shape, (x - cx) / radius, (y - cy) / radius)
            colour = np.clip(np.array(PALETTE[o.colour], np.float32) + rng.normal(0, 8, 3), 0, 255)
            img[mask] = colour
        img += rng.normal(0, c.noise, img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)

    def images(self, split: str, indices=None) -> np.ndarray:
        idx = range(self.config.split_size(split)) if indices is None else indices
        return np.stack([self.image(split, int(i)) for i in idx])

    # -- language -----------------------------------------------------------------------------------
    def references(self, split: str, index: int) -> list[str]:
        """Vague references, like weak human alt-text: mostly the salient object with details dropped,
        some generic, a minority naming two objects."""
        scene = self.scene(split, index)
        c = self.config
        rng = self._rng(split, index, 2)
        refs = []
        while len(refs) < c.refs_per_image:
            u = rng.random()
            if u < c.generic_ref_share:
                refs.append(GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))])
            elif u < c.generic_ref_share + c.two_object_ref_share and len(scene.objects) >= 2:
                pair = rng.choice(len(scene.objects), size=2, replace=False)
                first, second = (scene.objects[i] for i in sorted(pair.tolist()))
                m1 = mention(first, c.grid, _vague_drop(rng, c.ref_drop))
                m2 = mention(second, c.grid, _vague_drop(rng, c.ref_drop))
                if m1 != m2:  # never state the same thing twice
                    refs.append(f"{m1} and {m2}")
            else:
                if rng.random() < c.salient_ref_share:
                    obj = scene.salient()
                else:
                    obj = scene.objects[rng.integers(len(scene.objects))]
                refs.append(mention(obj, c.grid, _vague_drop(rng, c.ref_drop)))
        return refs


def _vague_drop(rng: np.random.Generator, chances: dict[str, float]) -> frozenset:
    """The attributes one mention leaves out: one draw per attribute, always in REF_DROP's order."""
    return frozenset(a for a in REF_DROP if rng.random() < chances[a])


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in coordinates normalised by its radius (v grows downwards)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.42)
    if shape == "square":
        return np.maximum(au, av) <= 0.78
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "triangle":
        t = (v + 0.85) / 1.7  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (au <= 0.95 * t)
    if shape == "star":
        rho, theta = np.sqrt(u * u + v * v), np.arctan2(v, u) + np.pi / 2
        return rho <= 0.42 + 0.6 * np.abs(np.cos(2.5 * theta)) ** 3
    raise ValueError(f"unknown shape {shape!r}")
