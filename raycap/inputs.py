"""What a run config names, opened: the frozen retriever, the captioner it starts from, and each split's images
with their frozen image embeddings (read from, or built into, the embedding cache).

Both runtimes call these: the reference loop in its one process, the Ray controller before it places its
actors (the cache's Ray Data pipeline then has the whole cluster, and the actors get the embeddings through
the object store, so no node needs the cache's disk).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raycap.config import WORLD_DIR, DataConfig, RetrieverConfig, RunConfig, RuntimeConfig
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
    inputs: torch.Tensor | None = None  # what the captioner reads when not the embeddings (patch tokens, BLIP's)

    @property
    def captioner_inputs(self) -> torch.Tensor:
        """Row i: what the captioner reads for image i (ClipCap: the retriever's embedding)."""
        return self.embeddings if self.inputs is None else self.inputs


def load_retriever(cfg: RetrieverConfig):
    from raycap.models.clip import LOCAL_DIR, Retriever
    from raycap.models.torch_io import refusing_pickles

    # open_clip reads a checkpoint file (`pretrained`, or the *.bin / *.pth of a model directory) with torch.load
    # (weights_only=True): a pickled one is refused in one line naming it
    where = cfg.pretrained if cfg.pretrained and Path(cfg.pretrained).is_file() else cfg.path or (
        cfg.name[len(LOCAL_DIR):] if cfg.name and cfg.name.startswith(LOCAL_DIR) else cfg.name)
    if where and Path(where).is_dir():
        pickled = sorted(p for ext in ("*.bin", "*.pth", "*.pt") for p in Path(where).glob(ext))
        where = pickled[0] if len(pickled) == 1 else where
    with refusing_pickles(where):
        return Retriever.load(name=cfg.name, pretrained=cfg.pretrained, path=cfg.path).freeze()


def load_captioner(path: str | Path):
    """(captioner, tokenizer) of a raycap captioner dir."""
    from raycap.models.loading import load_captioner as load

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"captioner.path {path}: no such directory")
    return load(path)


def captioner_on_device(path: str | Path, retriever, captioner_label: str, retriever_label: str, device: str = "auto"):
    """(captioner, tokenizer, retriever, device): a captioner dir checked against the retriever whose embeddings
    it reads (`check_compatible`, naming both by their labels), both moved to `device` (auto, cpu, cuda, cuda:N)
    in eval mode."""
    from raycap.models.devices import resolve_device

    captioner, tokenizer = load_captioner(path)
    check_compatible(captioner, retriever, captioner_label, retriever_label)
    where = resolve_device(device)
    return captioner.to(where).eval(), tokenizer, retriever.to(where).eval(), where


def check_compatible(captioner, retriever, captioner_label: str, retriever_label: str) -> None:
    """The captioner reads the retriever's image embeddings: their widths must agree (one line if not, naming
    both as the user gave them)."""
    if not getattr(captioner, "reads_retriever_embeddings", True):  # BLIP reads its own vision features
        return
    if getattr(captioner, "reads_image_tokens", False):
        want = (captioner.config.clip_length, captioner.config.clip_dim)
        try:
            have = retriever.token_shape
        except UserError as e:
            raise UserError(f"{captioner_label} reads image tokens, but {e}") from None
        if tuple(want) != tuple(have):
            raise UserError(f"{captioner_label} reads {want[0]} image tokens of width {want[1]} but the retriever "
                            f"{retriever_label} gives {have[0]} of width {have[1]}; use a captioner trained on "
                            "this retriever's tokens")
        return
    want, have = captioner.config.clip_dim, retriever.embed_dim
    if want != have:
        raise UserError(f"{captioner_label} reads {want}-d image embeddings but the retriever {retriever_label} "
                        f"gives {have}-d; use a captioner trained on this retriever's embeddings")


def check_run_compatible(captioner, retriever, cfg: RunConfig) -> None:
    check_compatible(captioner, retriever, f"captioner.path {cfg.captioner.path}",
                     cfg.retriever.path or f"{cfg.retriever.name} ({cfg.retriever.pretrained})")
    if cfg.rl.method == "gumbel" and not getattr(captioner, "soft_decoding", False):
        raise UserError(f"rl.method=gumbel: captioner.path {cfg.captioner.path} is a {type(captioner).__name__}; "
                        "Gumbel decoding feeds soft tokens through a ClipCap's or a VLM's language model, use "
                        "rl.method=discritune for it")


def add_retriever_arguments(p, default: Path) -> None:
    """`--retriever DIR` or `--retriever-name NAME [--pretrained TAG]` of a command line."""
    p.add_argument("--retriever", type=Path, help=f"retriever dir, raycap or open_clip (default: {default})")
    p.add_argument("--retriever-name", help="an open_clip model name instead, e.g. ViT-B-32")
    p.add_argument("--pretrained", help="its open_clip pretrained tag or checkpoint file, e.g. openai")


def check_retriever_arguments(args) -> None:
    if args.pretrained and not args.retriever_name:
        raise UserError("--pretrained needs --retriever-name (the open_clip model it belongs to)")
    if args.retriever_name and args.retriever:
        raise UserError("--retriever and --retriever-name: give one of them")


def retriever_from_arguments(args, default: Path):
    """(frozen retriever, how the user named it) from `add_retriever_arguments`' flags."""
    if args.retriever_name:
        cfg = RetrieverConfig(name=args.retriever_name, pretrained=args.pretrained)
        return load_retriever(cfg), f"{args.retriever_name} ({args.pretrained})"
    path = args.retriever or default
    return load_retriever(RetrieverConfig(path=str(path))), str(path)


def load_world(path: str | Path | None) -> World:
    """The world of a pretrained world dir (or its world.json); the shipped world by default."""
    path = Path(path) if path else WORLD_DIR
    file = path / "world.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"data.path {path}: no world.json there (a world dir comes from "
                        "`python -m raycap.pretrain world --out DIR`)")
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    return World(WorldConfig.parse(data, str(file)))


class ExportedWorldSource(FileSource):
    """The files written by `python -m raycap.data export-world`, read by the Karpathy reader, that also know
    their scenes (the judge of the world's caption checks), rebuilt from the world config and each image's split
    and index stored in the JSON."""

    def __init__(self, base: FileSource):
        super().__init__(base.name, base.records, base.labelled)
        self.world = World(WorldConfig.parse(base.world_config, f"{base.name}: world"))

    @property
    def scenes(self):
        return [self.world.scene(r.extra["split"], int(r.extra["world_index"])) for r in self.records]


WORLD_SPLITS = ("train", "labelled", "val", "test")


def open_images(kind: str, path: str | Path | None, split, where: str, image_root: str | None = None,
                captions: str | None = None, on_bad_image: str = "error") -> tuple[ImageSource, list[dict]]:
    """One split of a dataset (`kind` as in `data.kind`; a world split from the world dir `path`) and the items
    its reader left out. `where` names the setting in errors (`data.splits.val`, `--dataset world:x`)."""
    if kind == "world":
        if not isinstance(split, str):
            raise UserError(f"{where}: the world takes one split name, got {split!r}")
        world = load_world(path)
        if split not in WORLD_SPLITS:
            raise UserError(f"{where}: unknown world split {split!r} ({', '.join(WORLD_SPLITS)})")
        return WorldSource(world, split), []
    from raycap.data.datasets import open_files

    source, skipped = open_files(kind, path, split, image_root=image_root, captions=captions,
                                 on_bad_image=on_bad_image)
    if getattr(source, "world_config", None) and all("world_index" in r.extra for r in source.records):
        source = ExportedWorldSource(source)
    return source, [{"id": s.id, "path": s.path, "reason": s.reason} for s in skipped]


@contextmanager
def local_ray_for(sources, runtime: RuntimeConfig):
    """While `sources` are embedded: a local Ray for the cache's Ray Data builder (stopped after), when one of
    them is image files and no Ray is running yet."""
    import ray

    started = False
    if any(getattr(s, "paths", None) is not None for s in sources) and not ray.is_initialized():
        from raycap.ray_start import free_port, start_ray

        started, _ = start_ray(runtime.model_copy(update={"dashboard_port": free_port()}))
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def open_source(data: DataConfig, role: str) -> tuple[ImageSource, list[dict]]:
    """The images of one split role (train, val, test) and the reader's skipped items."""
    return open_images(data.kind, data.path, data.splits[role], f"data.splits.{role}", image_root=data.image_root,
                       captions=data.captions, on_bad_image=data.on_bad_image)


EVAL_CANDIDATES = 100  # P@1 ranks each evaluated image among 100 (raycap.metrics.retrieval.candidate_sets)


def check_data_sizes(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """Before anything runs: the settings that take images from a split fit its size (`sizes`: images per split
    role). One line naming the setting and the split's size: an rl batch or a reward's candidates larger than the
    training split would fail at the first update, an evaluation split under 100 images at the first evaluation."""
    train = sizes.get("train")
    if train is not None:
        where = f"data.splits.train ({cfg.data.splits['train']}" + (
            f", first data.train_images={cfg.data.train_images}" if cfg.data.train_images else "") + ")"
        if cfg.rl.batch_size > train:
            raise UserError(f"rl.batch_size {cfg.rl.batch_size}: more than the {train} training images of {where}; "
                            f"an update takes rl.batch_size distinct images, so at most {train}")
        if cfg.rl.reward.num_candidates > train:
            raise UserError(f"rl.reward.num_candidates {cfg.rl.reward.num_candidates}: more than the {train} "
                            f"training images of {where} it draws candidates from; at most {train}")
        reward = cfg.rl.reward
        reach = [("rl.reward.hard_distractors", reward.hard_distractors)] + [
            (f"rl.reward.curriculum[{i}]", st.hard_distractors + st.skip_nearest)
            for i, st in enumerate(reward.curriculum) if st.hard_distractors]
        for name, n in reach:
            if n >= train:
                raise UserError(f"{name}: reaches the {n} nearest of the {train} training images of {where}; "
                                f"hard distractors come from the other {train - 1}")
    for role in ("val", "test"):
        n = sizes.get(role)
        if n is not None and n < EVAL_CANDIDATES:
            raise UserError(f"data.splits.{role} ({cfg.data.splits[role]}): {n} images; an evaluation ranks each "
                            f"among {EVAL_CANDIDATES} (P@1), so at least {EVAL_CANDIDATES} are needed")


def world_split_sizes(cfg: RunConfig) -> dict[str, int]:
    """The images of each split role of a world run, from its world.json alone (nothing built or read else);
    {} for other data kinds, or when the world.json is not readable yet (`open_splits` says why)."""
    if cfg.data.kind != "world":
        return {}
    path = Path(cfg.data.path) if cfg.data.path else WORLD_DIR
    file = path / "world.json" if path.is_dir() else path
    try:
        world = WorldConfig.parse(json.loads(file.read_text()), str(file))
    except (OSError, ValueError):
        return {}
    sizes = {}
    for role, split in cfg.data.splits.items():
        if isinstance(split, str) and split in ("train", "labelled", "val", "test"):
            sizes[role] = world.split_size(split)
    if "train" in sizes and cfg.data.train_images:
        sizes["train"] = min(sizes["train"], cfg.data.train_images)
    return sizes


def open_splits(cfg: RunConfig, retriever, log=print, captioner=None, for_run: bool = True) -> dict[str, SplitImages]:
    """train, val and test images with their embeddings (train: the first `data.train_images` if set). Image
    files are embedded with Ray Data, on a local Ray started here (and stopped after) when none is running.
    Images the reader or the cache left out (`data.on_bad_image: skip`) are reported and listed in `skipped`.
    With the run's `captioner`, its cached vision features that would not fit are refused before anything is
    embedded (`vision_feature_mode`). `for_run`: the run's settings are checked against the splits' sizes
    (`check_data_sizes`) before anything is embedded, and again once images were left out."""
    from raycap.data.cache import retriever_fingerprint

    opened = {}
    for role in ("train", "val", "test"):
        source, skipped = open_source(cfg.data, role)
        if role == "train" and cfg.data.train_images:
            source = source.subset(range(min(cfg.data.train_images, len(source))))
        opened[role] = (source, skipped)
    if for_run:
        check_data_sizes(cfg, {role: len(source) for role, (source, _) in opened.items()})  # before any embedding
    if captioner is not None:
        vision_feature_mode(captioner, sum(len(s) for s, _ in opened.values()), cfg.captioner.vision_features)
    fingerprint = retriever_fingerprint(retriever)  # once for the three splits' cache keys
    with local_ray_for([source for source, _ in opened.values()], cfg.runtime):
        splits = {role: _embed(cfg, retriever, fingerprint, role, source, skipped, log)
                  for role, (source, skipped) in opened.items()}
    if for_run:
        check_data_sizes(cfg, {role: len(s.source) for role, s in splits.items()})  # images left out (on_bad_image)
    return splits


def open_split(cfg: RunConfig, retriever, role: str, log=print) -> SplitImages:
    """One split role's images and embeddings, as `open_splits` opens them (for reading one split alone; train:
    the first `data.train_images` if set)."""
    from raycap.data.cache import retriever_fingerprint

    source, skipped = open_source(cfg.data, role)
    if role == "train" and cfg.data.train_images:
        source = source.subset(range(min(cfg.data.train_images, len(source))))
    with local_ray_for([source], cfg.runtime):
        return _embed(cfg, retriever, retriever_fingerprint(retriever), role, source, skipped, log)


def _embed(cfg: RunConfig, retriever, fingerprint: str, role: str, source: ImageSource, skipped: list[dict],
           log) -> SplitImages:
    from raycap.data.cache import image_embeddings

    cached = image_embeddings(retriever, source, on_bad_image=cfg.data.on_bad_image, log=log,
                              fingerprint=fingerprint)
    skipped = skipped + [dict(s) for s in cached.skipped]
    if len(cached.kept) < len(source):
        source = source.subset(cached.kept.tolist())
    if skipped:
        log(f"{role}: left out {len(skipped)} images (data.on_bad_image: skip), e.g. "
            + "; ".join(f"{s.get('id')}: {s.get('reason')}" for s in skipped[:3]))
    if len(source) < 2:
        raise UserError(f"data.splits.{role}: {len(source)} usable images; a run needs at least 2")
    return SplitImages(role, source, cached.embeddings, skipped)


class ImageRows:
    """A split's images as the pixel values a captioner with its own vision tower reads (BLIP), produced per
    batch instead of held: a tensor-like stand-in for its (N, 3, S, S) inputs. Indexing with image indices (a
    tensor or list) reads those images and returns their pixel values on the CPU; a slice is another lazy view;
    `.to(device)` reads all rows of the view (callers slice a chunk first). The captioner runs its frozen vision
    tower on those pixels on its own device (`_start`), so memory holds one batch, at any dataset size."""

    def __init__(self, source: ImageSource, processor, rows: range | None = None):
        self.source, self.processor = source, processor
        self.rows = range(len(source)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ImageRows(self.source, self.processor, self.rows[index])
        ids = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        return self.pixels([self.rows[int(i)] for i in ids])

    def pixels(self, ids) -> torch.Tensor:
        """Pixel values (len(ids), 3, S, S) of the source's images `ids`."""
        return self.processor(images=[self.source.image(i) for i in ids], return_tensors="pt")["pixel_values"]

    def to(self, device=None, dtype=None) -> torch.Tensor:
        return self.pixels(list(self.rows)).to(device=device, dtype=dtype)


VISION_FEATURES = ("auto", "cached", "per_batch")


def vision_feature_mode(captioner, n_images: int, setting: str = "auto", memory_bytes: int | None = None,
                        log=None) -> str:
    """"cached" or "per_batch" for a captioner with its own vision tower and `n_images` images under
    `captioner.vision_features` (`auto`: cached when they fit, `check_cached_inputs_fit`, else per batch, said
    on `log`); "cached" for every other captioner. `cached` that would not fit is refused in one line."""
    if setting not in VISION_FEATURES:
        raise UserError(f"captioner.vision_features: {setting!r} is not one of {', '.join(VISION_FEATURES)}")
    if own_feature_shape(captioner) is None:
        return "cached"
    if setting == "per_batch":
        return "per_batch"
    try:
        check_cached_inputs_fit(captioner, n_images, memory_bytes)
        return "cached"
    except UserError as e:
        if setting == "cached":
            raise
        if log:
            log(f"captioner.vision_features auto -> per_batch: {str(e).split('; ')[0]}")
        return "per_batch"


def captioner_inputs(captioner, source: ImageSource, embeddings: torch.Tensor, batch: int = 256, log=print,
                     retriever=None, vision_features: str = "auto"):
    """What the captioner reads for each image of `source`: the retriever's embeddings (ClipCap), the retriever's
    patch tokens (a ClipCap with `image_input: tokens`, from the embedding cache), or, for a captioner with its
    own frozen vision tower (BLIP: `reads_retriever_embeddings = False`), that tower's features, computed once
    here in batches (the image side stays frozen, so they hold for the whole run), or with `vision_features`
    per_batch (or auto, when cached ones would not fit) the images' `ImageRows`, read per batch."""
    if getattr(captioner, "reads_image_tokens", False):
        if retriever is None:
            raise ValueError("a captioner reading image tokens needs the retriever whose tokens it reads")
        from raycap.data.cache import image_embeddings

        return image_embeddings(retriever, source, log=log, features="tokens").embeddings
    if getattr(captioner, "reads_retriever_embeddings", True):
        return embeddings
    if vision_feature_mode(captioner, len(source), vision_features, log=log) == "per_batch":
        log(f"{source.name}: {len(source)} images -> vision features per batch from the images")
        return ImageRows(source, captioner.processor)
    from raycap.progress import progress

    parts = [captioner.encode_images([source.image(i) for i in range(k, min(k + batch, len(source)))])
             for k in progress(range(0, len(source), batch), desc=f"{source.name} features")]
    features = torch.cat(parts)
    log(f"{source.name}: {len(source)} images -> captioner features {tuple(features.shape[1:])} "
        f"({features[0].numel() * features.element_size() / 1024:.1f} KiB per image)")
    return features


def own_feature_shape(captioner) -> tuple[int, ...] | None:
    """The shape of what a captioner with its own vision tower caches per image (`cached_input_shape`, from its
    config alone: BLIP's vision features (tokens, width), a VLM's pixel row); None for a captioner that reads the
    retriever's embeddings."""
    if getattr(captioner, "reads_retriever_embeddings", True):
        return None
    return tuple(captioner.cached_input_shape)


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cached_inputs_fit(captioner, n_images: int, memory_bytes: int | None = None,
                            share: float = 0.5) -> None:
    """Refuse, in one line with the estimate and before any feature is computed, cached captioner features of
    `n_images` images (BLIP's own vision features, a VLM's pixel rows; fp32) larger than `share` of the machine's memory: the
    controller holds them and Ray's object store holds another copy."""
    shape = own_feature_shape(captioner)
    if shape is None:
        return
    memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
    per_image = math.prod(shape) * 4
    need = n_images * per_image
    if need > share * memory:
        raise UserError(f"captioner features for {n_images:,} images ({' x '.join(map(str, shape))} float32, "
                        f"{per_image / 2**20:.2f} MiB each) need {need / 1e9:.1f} GB, more than {share:.0%} of this "
                        f"machine's {memory / 1e9:.1f} GB memory; set captioner.vision_features: per_batch (or auto) "
                        "to compute them per batch from the images, or use fewer images")


def attach_captioner_inputs(captioner, splits: dict[str, SplitImages], retriever, vision_features: str = "auto",
                            log=print) -> None:
    """Give each split the captioner's own inputs when it does not read the retriever's embeddings: cached
    features for all splits, or every split's `ImageRows` (`vision_feature_mode` over all their images, decided
    before any feature is computed)."""
    mode = vision_feature_mode(captioner, sum(len(s.source) for s in splits.values()), vision_features, log=log)
    for s in splits.values():
        inputs = captioner_inputs(captioner, s.source, s.embeddings, log=log, retriever=retriever,
                                  vision_features="cached" if mode == "cached" else "per_batch")
        s.inputs = None if inputs is s.embeddings else inputs


def skipped_counts(splits: dict[str, SplitImages]) -> dict[str, int]:
    return {role: len(s.skipped) for role, s in splits.items()}
