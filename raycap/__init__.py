"""raycap: Ray-distributed reinforcement learning for image captioners (DiscriTune, CLIP-relevance Gumbel).

The Python API (`raycap.api`), loaded on first use so that `import raycap` starts nothing and imports no torch:

    raycap.train(config, out=..., overrides={...}, runtime="ray") -> raycap.api.Run
    raycap.evaluate(captioner=... | captions=..., dataset="world:test", **options) -> dict
    raycap.load_captioner(dir) -> raycap.api.Captioner, with .caption(images)
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "load_captioner", "Run", "Captioner", "run_config"]


def __getattr__(name: str):
    import importlib

    if name in ("train", "evaluate"):  # the entry-point modules, callable as the API's functions
        return importlib.import_module(f"raycap.{name}")
    if name in ("load_captioner", "Run", "Captioner", "run_config"):
        return getattr(importlib.import_module("raycap.api"), name)
    raise AttributeError(f"module 'raycap' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
