"""A dataset item left out (a missing image with `data.on_bad_image: skip`, an absent Conceptual Captions
image): counted and reported by the run, never dropped silently."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Skipped:
    id: str
    path: str
    reason: str
