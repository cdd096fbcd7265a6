"""One interface for every image collection raycap reads: an `ImageSource` gives ids, images (RGB PIL) and,
when labelled, reference captions. The procedural world is one source (`WorldSource`); the dataset readers
(karpathy.py, coco.py, conceptual.py, nocaps.py, folder.py) build `FileSource`s. The RL loop never touches
pixels: it reads the frozen image embeddings that `raycap.data.cache` computes from a source.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from raycap.errors import UserError


class BadImage(UserError):
    """An image that cannot be read: missing, truncated or not an image. The message names the file and, where
    the reader can leave such images out, how: `SKIP` (the config's setting), which a command line swaps for
    its own flag with `naming(flag)`."""

    SKIP = "set data.on_bad_image: skip"

    def naming(self, remedy: str) -> "BadImage":
        """The same error, with `remedy` (e.g. "pass --on-bad-image skip") in place of the config's setting."""
        return BadImage(str(self).replace(self.SKIP, remedy))


class ImageSource:
    """A fixed, ordered collection of images. Subclasses set `name`, `ids` and implement `image`."""

    name: str
    ids: list[str]
    labelled: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> Image.Image:
        """Image `i` as an RGB PIL image; `BadImage` (naming the file) when it cannot be read."""
        raise NotImplementedError

    def references(self, i: int) -> list[str]:
        """Reference captions of image `i` (labelled sources only)."""
        raise UserError(f"{self.name}: image {self.ids[i]!r} has no references (the source is unlabelled)")

    def fingerprint(self) -> dict:
        """What identifies the source's content, for the embedding cache: a changed fingerprint rebuilds it."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "ImageSource":
        """The same source restricted to `indices` (in that order)."""
        return Subset(self, list(indices))

    @property
    def scenes(self):
        """The world's ground-truth scenes when the images are the world's (the judge); None otherwise."""
        return None


class Subset(ImageSource):
    def __init__(self, parent: ImageSource, indices: list[int]):
        self.parent, self.indices = parent, indices
        self.name, self.labelled = parent.name, parent.labelled
        self.ids = [parent.ids[i] for i in indices]

    def image(self, i: int) -> Image.Image:
        return self.parent.image(self.indices[i])

    def references(self, i: int) -> list[str]:
        return self.parent.references(self.indices[i])

    def fingerprint(self) -> dict:
        h = hashlib.sha256(np.asarray(self.indices, np.int64).tobytes()).hexdigest()[:16]
        return {**self.parent.fingerprint(), "subset": h}

    @property
    def scenes(self):
        parent = self.parent.scenes
        return None if parent is None else [parent[i] for i in self.indices]


@dataclass
class Record:
    """One image file of a dataset: its id, path, references (empty when unlabelled) and extra fields."""

    id: str
    path: Path
    references: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class FileSource(ImageSource):
    """Images stored as files (any format PIL reads), as the dataset readers build them."""

    def __init__(self, name: str, records: list[Record], labelled: bool, scenes=None):
        self.name, self.records, self.labelled = name, records, labelled
        self.ids = [r.id for r in records]
        self.paths = [str(r.path) for r in records]
        self._scenes = scenes

    def image(self, i: int) -> Image.Image:
        return load_image(self.records[i].path)

    def references(self, i: int) -> list[str]:
        if not self.labelled or not self.records[i].references:
            return super().references(i)
        return self.records[i].references

    def fingerprint(self) -> dict:
        """File list with sizes and modification times (cheap: one stat per file, no reading)."""
        h = hashlib.sha256()
        for p in self.paths:
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
        return {"kind": "files", "name": self.name, "n": len(self.paths), "files": h.hexdigest()}

    @property
    def scenes(self):
        return self._scenes


def load_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, fully decoded; `BadImage` naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImage(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: cannot read image ({' '.join(str(e).split()) or type(e).__name__})") from None


class WorldSource(ImageSource):
    """A split of the procedural shapes world, drawn in memory (no files)."""

    def __init__(self, world, split: str, n: int | None = None):
        size = world.config.split_size(split)
        self.world, self.split, self.n = world, split, min(n or size, size)
        self.name, self.labelled = f"world:{split}", True
        self.ids = [f"{split}-{i}" for i in range(self.n)]

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.world.image(self.split, i))

    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (N, H, W, 3): the world's images without a PIL round trip."""
        return self.world.images(self.split, indices)

    def references(self, i: int) -> list[str]:
        return self.world.references(self.split, i)

    def fingerprint(self) -> dict:
        return {"kind": "world", "world": self.world.config.identity(), "split": self.split,
                "n": self.n}

    @property
    def scenes(self):
        return [self.world.scene(self.split, i) for i in range(self.n)]
