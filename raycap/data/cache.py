"""Frozen CLIP image embeddings of an image source, computed once and cached on disk (the RL loop, hard-distractor
kNN and evaluation read them; nothing in the loop touches pixels).

A cache entry is a directory `RAYCAP_CACHE/embeddings/<key>/` of safetensors shards plus `manifest.json`; the
key hashes the dataset's fingerprint (files, sizes, mtimes; or the world's config), the retriever's weights and
the preprocessing, so a changed dataset or retriever builds a new entry. An entry is built in a private temp
directory and renamed into place, so a reader never sees a partial one and two runs building the same entry at
once both succeed (the second rename loses, and that run reads the winner's).

Two builders give the same embeddings: `ray` (Ray Data: decode + the retriever's own transform in tasks, the
image tower in an actor pool, on GPUs when the cluster has them) for image files, and `local` (in-process) for
the in-memory world and small sources.

`features="tokens"` caches the image tower's patch tokens instead (N, tokens, width; float16 to halve their
size), what a captioner with `image_input: tokens` reads; an entry of its own, keyed the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raycap.data.sources import BadImage, ImageSource, WorldSource
from raycap.data.world import World
from raycap.progress import progress, quiet_logger

MANIFEST = "manifest.json"
SHARD_ROWS = 50_000


def cache_dir() -> Path:
    return Path(os.environ.get("RAYCAP_CACHE", Path.home() / ".cache" / "raycap"))


FEATURES = ("embedding", "tokens")


@dataclass
class CachedEmbeddings:
    embeddings: torch.Tensor  # (N_kept, D) float32, L2-normalised, source order; or (N_kept, T, W) float16 tokens
    kept: torch.Tensor        # (N_kept,) indices into the source
    skipped: list[dict]       # [{"id", "index", "reason"}]: images that could not be read (on_bad_image: skip)
    path: Path | None         # the cache entry (None when use_cache=False)
    built: bool               # built by this call (else read from disk)


def retriever_fingerprint(retriever) -> str:
    h = hashlib.sha256()
    for name, t in sorted(retriever.model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(retriever, source: ImageSource, fingerprint: str | None = None,
              features: str = "embedding") -> tuple[str, dict]:
    """The entry's name and what it hashes; `fingerprint`: the retriever's, when the caller computed it already."""
    parts = {"dataset": source.fingerprint(), "retriever": fingerprint or retriever_fingerprint(retriever),
             "preprocess": repr(retriever.preprocess())}
    if features != "embedding":  # the embeddings' keys stay what they were
        parts["features"] = features
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


def image_embeddings(retriever, source: ImageSource, *, on_bad_image: str = "error", builder: str = "auto",
                     batch_size: int = 256, use_cache: bool = True, shard_rows: int = SHARD_ROWS,
                     log=print, fingerprint: str | None = None, features: str = "embedding") -> CachedEmbeddings:
    """The source's image embeddings: read from the cache, or built (and cached). Unreadable images raise
    `BadImage` naming the file (`on_bad_image="error"`) or are left out and listed (`"skip"`).
    `fingerprint`: the retriever's, passed when embedding several sources with one retriever (hashing its weights
    once). `features="tokens"`: the image tower's patch tokens instead (float16)."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if builder == "auto":
        builder = "ray" if getattr(source, "paths", None) is not None else "local"
    key, parts = cache_key(retriever, source, fingerprint, features) if use_cache else (None, None)
    final = cache_dir() / "embeddings" / key if use_cache else None
    if use_cache and (final / MANIFEST).is_file():
        return _read(final, source, on_bad_image)
    t = time.perf_counter()
    build = _build_ray if builder == "ray" else _build_local
    emb, kept, skipped = build(retriever, source, on_bad_image, batch_size, features == "tokens")
    if features == "tokens":
        emb = emb.half()
    rate = len(source) / max(time.perf_counter() - t, 1e-9)
    what = "embedded" if features == "embedding" else "took the patch tokens of"
    log(f"{what} {len(kept)} images of {source.name} ({rate:.0f} images/s, {builder} builder)"
        + (f"; left out {len(skipped)} unreadable" if skipped else ""))
    if not use_cache:
        return CachedEmbeddings(emb, kept, skipped, None, True)
    _write(final, emb, kept, skipped, parts, source, builder, shard_rows)  # a concurrent winner's entry is equal
    return CachedEmbeddings(emb, kept, skipped, final, True)


def world_image_embeddings(retriever, world: World, split: str, n: int | None = None,
                           use_cache: bool = True) -> torch.Tensor:
    """(n, D) embeddings of a world split's first n images."""
    return image_embeddings(retriever, WorldSource(world, split, n), use_cache=use_cache,
                            log=lambda *_: None).embeddings


# -- reading and writing -----------------------------------------------------------------------------------
def _read(path: Path, source: ImageSource, on_bad_image: str) -> CachedEmbeddings:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["skipped"] and on_bad_image == "error":  # built by a run that skipped: this one must not
        raise _bad(source, manifest["skipped"])
    shards = [load_file(str(path / name)) for name in manifest["shards"]]
    shape = manifest.get("shape", [manifest["dim"]])
    emb = torch.cat([s["embeddings"] for s in shards]) if shards else torch.zeros(0, *shape)
    kept = torch.cat([s["kept"] for s in shards]) if shards else torch.zeros(0, dtype=torch.long)
    return CachedEmbeddings(emb, kept, manifest["skipped"], path, False)


def _write(final: Path, emb, kept, skipped, parts, source, builder, shard_rows) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        names = []
        for k in range(0, max(len(emb), 1), shard_rows):
            name = f"part-{len(names):05d}.safetensors"
            save_file({"embeddings": emb[k:k + shard_rows].contiguous(), "kept": kept[k:k + shard_rows].contiguous()},
                      str(tmp / name))
            names.append(name)
        manifest = {"source": source.name, "n": len(source), "kept": len(kept), "dim": int(emb.shape[-1]),
                    "shape": list(emb.shape[1:]),
                    "ids_sha256": hashlib.sha256("\n".join(source.ids).encode()).hexdigest(), "shards": names,
                    "skipped": skipped, "builder": builder, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **parts}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: an entry without it is never read
        try:
            os.rename(tmp, final)
        except OSError:  # another run renamed its (equal) entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _bad(source: ImageSource, skipped: list[dict]) -> BadImage:
    first = skipped[0]
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return BadImage(f"{first['reason']}{more}; {BadImage.SKIP} to leave unreadable images out "
                    f"(they are counted in the run's log)")


def _result(index: np.ndarray, emb: np.ndarray, ok: np.ndarray, reasons, source, on_bad_image):
    order = np.argsort(index, kind="stable")
    index, emb, ok = index[order], emb[order], ok[order]
    reasons = [reasons[i] for i in order]
    skipped = [{"id": source.ids[int(i)], "index": int(i), "reason": r} for i, r, good in zip(index, reasons, ok)
               if not good]
    if skipped and on_bad_image == "error":
        raise _bad(source, skipped)
    return torch.from_numpy(emb[ok]).float(), torch.from_numpy(index[ok]).long(), skipped


# -- builders ----------------------------------------------------------------------------------------------
def _decode(source: ImageSource, transform, indices) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Preprocessed pixels of `indices` (zeros where an image is unreadable), ok flags and reasons."""
    pixels, ok, reasons = [], [], []
    for i in indices:
        try:
            pixels.append(transform(source.image(int(i))).numpy())
            ok.append(True)
            reasons.append("")
        except BadImage as e:
            pixels.append(None)
            ok.append(False)
            reasons.append(str(e))
    shape = next((p.shape for p in pixels if p is not None), None)
    if shape is None:  # nothing readable in this batch: any shape will do, the rows are dropped
        shape = (3, 1, 1)
    pixels = [p if p is not None else np.zeros(shape, np.float32) for p in pixels]
    return np.stack(pixels).astype(np.float32), np.asarray(ok), reasons


def _feature_shape(retriever, tokens: bool) -> tuple[int, ...]:
    return tuple(retriever.token_shape) if tokens else (retriever.embed_dim,)


def _encode(retriever, pixels: torch.Tensor, tokens: bool) -> torch.Tensor:
    return retriever.encode_image_tokens(pixels) if tokens else retriever.encode_image(pixels)


@torch.no_grad()
def _build_local(retriever, source, on_bad_image, batch_size, tokens=False):
    n, embs, oks, reasons = len(source), [], [], []
    device = retriever.pixel_mean.device
    empty = np.zeros((0, *_feature_shape(retriever, tokens)), np.float32)
    if isinstance(source, WorldSource):  # no PIL round trip: the exact pixels of the world (chunks of 512)
        for k in range(0, n, 512):
            pixels = retriever.pixels(source.pixels(range(k, min(k + 512, n))))
            embs.append(_encode(retriever, pixels, tokens).float().cpu().numpy())
        emb = np.concatenate(embs) if embs else empty
        return _result(np.arange(n), emb, np.ones(n, bool), [""] * n, source, on_bad_image)
    transform = retriever.preprocess()
    for k in range(0, n, batch_size):
        pixels, ok, why = _decode(source, transform, range(k, min(k + batch_size, n)))
        embs.append(_encode(retriever, torch.from_numpy(pixels).to(device), tokens).float().cpu().numpy())
        oks.append(ok)
        reasons += why
    emb = np.concatenate(embs) if embs else empty
    return _result(np.arange(n), emb, np.concatenate(oks) if oks else np.zeros(0, bool), reasons, source,
                   on_bad_image)


class _Decode:
    """Ray Data actor: rows of image indices -> preprocessed pixels with ok flags and reasons."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __call__(self, batch: dict) -> dict:
        pixels, ok, reasons = _decode(self.source, self.transform, batch["index"])
        return {"index": batch["index"], "pixels": pixels, "ok": ok, "reason": np.asarray(reasons, dtype=object)}


class _Encode:
    """Ray Data actor: holds the frozen image tower (on the GPU when it was given one)."""

    def __init__(self, retriever, tokens: bool = False):
        import ray

        if isinstance(retriever, ray.ObjectRef):  # passed by reference: the tower is not pickled with the UDF
            retriever = ray.get(retriever)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.retriever, self.tokens = retriever.to(self.device).eval(), tokens

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        # Ray Data may hand over a read-only view of its block: torch needs a writable array (copied if not)
        x = torch.from_numpy(np.require(batch["pixels"], np.float32, ["C_CONTIGUOUS", "WRITEABLE"])).to(self.device)
        emb = _encode(self.retriever, x, self.tokens).float().cpu().numpy()
        return {"index": batch["index"], "embedding": emb, "ok": batch["ok"], "reason": batch["reason"]}


def _build_ray(retriever, source, on_bad_image, batch_size, tokens=False):
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("the ray builder needs a running Ray (raycap.inputs starts a local one)")
    gpus = ray.cluster_resources().get("GPU", 0)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # raycap's own progress below: a bar, or in a log file a line per interval
    n = len(source)
    ds = ray.data.from_items([{"index": i} for i in range(n)], override_num_blocks=max(1, min(64, n // batch_size)))
    decoders = max(1, int(ray.cluster_resources().get("CPU", 1)) - (0 if gpus else 1))  # one CPU for the encoder
    ds = ds.map_batches(_Decode, fn_constructor_args=(source, retriever.preprocess()), batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders))
    ds = ds.map_batches(_Encode, fn_constructor_args=(ray.put(retriever.cpu()), tokens), batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=max(1, int(gpus)) if gpus else 1),
                        num_gpus=1 if gpus else 0)
    index, emb, ok, reasons = [], [], [], []
    # Ray Data's per-dataset INFO lines (execution plan, start, finish) and its notice that its bars are off
    with quiet_logger("ray.data", logging.WARNING), quiet_logger("ray.data._internal.progress", logging.ERROR):
        bar = progress(None, total=n, desc=f"image embeddings of {source.name}")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if on_bad_image == "error" and not batch["ok"].all():  # stop at the first unreadable image
                bad = [{"reason": r} for r, good in zip(batch["reason"], batch["ok"]) if not good]
                raise _bad(source, bad)
            index.append(batch["index"])
            emb.append(batch["embedding"])
            ok.append(batch["ok"])
            reasons += list(batch["reason"])
            bar.update(len(batch["index"]))
        bar.close()
    if not index:
        return torch.zeros(0, *_feature_shape(retriever, tokens)), torch.zeros(0, dtype=torch.long), []
    return _result(np.concatenate(index), np.concatenate(emb), np.concatenate(ok).astype(bool), reasons, source,
                   on_bad_image)
