"""What a run config names, opened: the frozen retriever, the captioner it starts from, and each split's images
with their frozen image embeddings (read from, or built into, the embedding cache).

Both runtimes call these: the reference loop in its one process, the Ray controller before it places its
actors (the cache's Ray Data pipeline then has the whole cluster, and the actors get the embeddings through
the object store, so no node needs the cache's disk).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raycap.config import ASSETS_DIR, DataConfig, RetrieverConfig, RunConfig
from raycap.data.sources import FileSource, ImageSource, WorldSource
from raycap.data.world import World, WorldConfig
from raycap.errors import UserError


@dataclass
class SplitImages:
    """One split's usable images (those left out are in `skipped`) and their frozen embeddings, row for row."""

    role: str
    source: ImageSource
    embeddings: torch.Tensor
    skipped: list[dict] = field(default_factory=list)

    def first(self, n: int | None) -> "SplitImages":
        """The first n images (all when n is None or larger)."""
        n = len(self.source) if n is None else min(n, len(self.source))
        if n == len(self.source):
            return self
        return SplitImages(self.role, self.source.subset(range(n)), self.embeddings[:n], self.skipped)


def load_retriever(cfg: RetrieverConfig):
    from raycap.models.clip import Retriever

    return Retriever.load(name=cfg.name, pretrained=cfg.pretrained, path=cfg.path).freeze()


def load_captioner(path: str | Path):
    """(captioner, tokenizer) of a raycap captioner dir."""
    from raycap.models.loading import load_captioner as load

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"captioner.path {path}: no such directory")
    return load(path)


def check_compatible(captioner, retriever, cfg: RunConfig) -> None:
    """The captioner reads the retriever's image embeddings: their widths must agree (one line if not)."""
    want, have = captioner.config.clip_dim, retriever.embed_dim
    if want != have:
        where = cfg.retriever.path or f"{cfg.retriever.name} ({cfg.retriever.pretrained})"
        raise UserError(f"captioner.path {cfg.captioner.path} reads {want}-d image embeddings but the retriever "
                        f"{where} gives {have}-d; use a captioner trained on this retriever's embeddings")


def load_world(path: str | Path | None) -> World:
    """The world of a pretrained world dir (or its world.json); the shipped world by default."""
    path = Path(path) if path else ASSETS_DIR / "world"
    file = path / "world.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"data.path {path}: no world.json there (a world dir comes from "
                        "`python -m raycap.pretrain world --out DIR`)")
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    return World(WorldConfig.parse(data, str(file)))


class WorldFileScenes:
    """Scenes of dataset files written by `python -m raycap.data export-world` (the judge of the world's
    caption checks), rebuilt from the world config and each image's split and index stored in the JSON."""

    def __init__(self, world_config: dict, records):
        self.world = World(WorldConfig.parse(world_config, "dataset_world.json: world"))
        self.records = records

    def __call__(self):
        out = []
        for r in self.records:
            split = r.extra.get("split", "train")
            out.append(self.world.scene("train" if split == "labelled" else split, int(r.extra["world_index"])))
        return out


class ExportedWorldSource(FileSource):
    """A FileSource of the exported world's files that also knows its scenes (for the world's caption checks)."""

    def __init__(self, base: FileSource):
        super().__init__(base.name, base.records, base.labelled)
        self._scene_fn = WorldFileScenes(base.world_config, base.records)

    @property
    def scenes(self):
        return self._scene_fn()


def open_source(data: DataConfig, role: str) -> tuple[ImageSource, list[dict]]:
    """The images of one split role (train, val, test) and the reader's skipped items."""
    split = data.splits[role]
    if data.kind == "world":
        if not isinstance(split, str):
            raise UserError(f"data.splits.{role}: the world takes one split name, got {split!r}")
        world = load_world(data.path)
        if split not in ("train", "labelled", "val", "test"):
            raise UserError(f"data.splits.{role}: unknown world split {split!r} (train, labelled, val, test)")
        return WorldSource(world, split), []
    from raycap.data.datasets import open_files

    source, skipped = open_files(data.kind, data.path, split, image_root=data.image_root, captions=data.captions,
                                 on_bad_image=data.on_bad_image)
    if getattr(source, "world_config", None) and all("world_index" in r.extra for r in source.records):
        source = ExportedWorldSource(source)
    return source, [{"id": s.id, "path": s.path, "reason": s.reason} for s in skipped]


def open_splits(cfg: RunConfig, retriever, log=print) -> dict[str, SplitImages]:
    """train, val and test images with their embeddings (train: the first `data.train_images` if set). Image
    files are embedded with Ray Data, on a local Ray started here (and stopped after) when none is running.
    Images the reader or the cache left out (`data.on_bad_image: skip`) are reported and listed in `skipped`."""
    import ray

    opened = {}
    for role in ("train", "val", "test"):
        source, skipped = open_source(cfg.data, role)
        if role == "train" and cfg.data.train_images:
            source = source.subset(range(min(cfg.data.train_images, len(source))))
        opened[role] = (source, skipped)
    started = False
    if any(getattr(src, "paths", None) is not None for src, _ in opened.values()) and not ray.is_initialized():
        from raycap.runtime.resources import start_ray

        started, _ = start_ray(cfg.runtime.model_copy(update={"dashboard_port": free_port()}))
    try:
        return {role: _embed(cfg, retriever, role, source, skipped, log)
                for role, (source, skipped) in opened.items()}
    finally:
        if started:
            ray.shutdown()


def _embed(cfg: RunConfig, retriever, role: str, source: ImageSource, skipped: list[dict], log) -> SplitImages:
    from raycap.data.cache import image_embeddings

    cached = image_embeddings(retriever, source, on_bad_image=cfg.data.on_bad_image, log=log)
    skipped = skipped + [dict(s) for s in cached.skipped]
    if len(cached.kept) < len(source):
        source = source.subset(cached.kept.tolist())
    if skipped:
        log(f"{role}: left out {len(skipped)} images (data.on_bad_image: skip), e.g. "
            + "; ".join(f"{s.get('id')}: {s.get('reason')}" for s in skipped[:3]))
    if len(source) < 2:
        raise UserError(f"data.splits.{role}: {len(source)} usable images; a run needs at least 2")
    return SplitImages(role, source, cached.embeddings, skipped)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skipped_counts(splits: dict[str, SplitImages]) -> dict[str, int]:
    return {role: len(s.skipped) for role, s in splits.items()}
