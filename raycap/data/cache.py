"""Frozen CLIP image embeddings, computed once per (retriever weights, world, split) and cached on disk.
The RL loop never touches pixels: rewards, distractors and the captioner's prefix all read this cache."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raycap.data.world import World


def cache_dir() -> Path:
    return Path(os.environ.get("RAYCAP_CACHE", Path.home() / ".cache" / "raycap"))


def _key(retriever, world: World, split: str, n: int) -> str:
    h = hashlib.sha256()
    for name, t in sorted(retriever.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(world.config.model_dump_json().encode())
    h.update(f"{split}:{n}".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def world_image_embeddings(retriever, world: World, split: str, n: int | None = None,
                           use_cache: bool = True) -> torch.Tensor:
    """(n, D) L2-normalised embeddings of the split's first n images."""
    n = min(n or world.config.split_size(split), world.config.split_size(split))
    path = cache_dir() / "embeddings" / f"{_key(retriever, world, split, n)}.safetensors"
    if use_cache and path.exists():
        return load_file(str(path))["embeddings"]
    out = retriever.encode_pixels(world.images(split, range(n))).float()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a private temp name in the same dir, then an atomic rename: runs building one cache at once each
        # write their own file and the last rename wins (both files hold the same embeddings)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"embeddings": out.contiguous()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out
