"""The shapes world written as real files: `python -m raycap.data export-world --out DIR`.

DIR/images/{train,val,test}/{index:06d}.png   the world's images, lossless PNG (pixels equal `World.image`)
DIR/dataset_world.json                        Karpathy format: per image its split, world index, `labelled`
                                              (the first n_labelled train images) and the 5 vague references
DIR/retriever/                                the world retriever as an open_clip model directory:
                                              `open_clip.create_model("local-dir:DIR/retriever")`, with the
                                              world's word-level HF tokenizer (`Retriever.load(path=...)`)
DIR/README.txt                                what this is and the command that wrote it

So a real-data code path (a Karpathy-format reader, open_clip, an image folder) can be run on the world and its
numbers compared with the in-memory world's. Re-running into the same DIR resumes: images already there (a PNG
of the right size) are kept; the JSON, the retriever and README are rewritten. DIR must be new, empty, or an
export of the same world (DIR/.raycap-export.json, written before anything else; an export from before that
file is recognised by its dataset_world.json): any other directory is refused, so no file of the user's is
overwritten or deleted.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from raycap.config import WORLD_DIR
from raycap.data.world import World, WorldConfig
from raycap.errors import UserError

EXPORT_SPLITS = ("train", "val", "test")
DATASET_FILE, README_FILE, RETRIEVER_DIR = "dataset_world.json", "README.txt", "retriever"
MARKER_FILE = ".raycap-export.json"  # written first into a new export: {"world": its config}; what makes a resume
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # open_clip's first choice in a local-dir: directory
HF_TOKENIZER_NAME = "raycap-world"
SHIPPED_WORLD = WORLD_DIR.resolve()


def default_workers() -> int:
    """The CPUs this process may run on (os.cpu_count() unless an affinity mask says fewer)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def image_path(out: str | Path, split: str, index: int) -> Path:
    return Path(out) / "images" / split / f"{index:06d}.png"


# -- images ---------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(config: dict, out: str) -> None:
    _WORKER["world"], _WORKER["out"] = World(WorldConfig.model_validate(config)), out


def _png_ok(path: Path, size: int) -> bool:
    """Whether `path` is a PNG of the world's size (files are written atomically, so one that is there is whole)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.size == (size, size) and im.mode == "RGB"
    except (OSError, ValueError):
        return False


def _write_image(task: tuple[str, int]) -> bool:
    """Write one image (in a pool worker); False when a good one was already there (resume)."""
    from PIL import Image

    split, index = task
    world, out = _WORKER["world"], _WORKER["out"]
    path = image_path(out, split, index)
    if path.exists() and _png_ok(path, world.config.image_size):
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(world.image(split, index), mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)
    return True


def write_images(world: World, out: Path, counts: dict[str, int], workers: int, show_progress: bool = True) -> int:
    """Write the first `counts[split]` images of each split in parallel; returns how many were written (the rest
    were there already)."""
    from raycap.progress import progress

    for split in counts:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    tasks = [(split, i) for split, n in counts.items() for i in range(n)]
    if not tasks:
        return 0
    written = 0
    if workers <= 1:
        _init_worker(world.config.model_dump(), str(out))
        results: Iterable[bool] = map(_write_image, tasks)
        pool = None
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(world.config.model_dump(), str(out)))
        results = pool.map(_write_image, tasks, chunksize=max(1, min(256, len(tasks) // (8 * workers))))
    try:
        bar = progress(results, total=len(tasks), desc="images") if show_progress else results
        for new in bar:
            written += int(new)
        if show_progress:
            bar.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _WORKER.clear()
    return written


# -- Karpathy JSON --------------------------------------------------------------------------------------
def karpathy_json(world: World, counts: dict[str, int]) -> dict:
    """The Karpathy-format dataset of the exported images: train, val, test, each in index order."""
    c = world.config
    images, imgid, sentid = [], 0, 0
    for split in EXPORT_SPLITS:
        for index in range(counts.get(split, 0)):
            refs = world.references(split, index)
            sentences = [{"raw": r, "tokens": r.split(), "imgid": imgid, "sentid": sentid + k}
                         for k, r in enumerate(refs)]
            images.append({"filepath": f"images/{split}", "filename": f"{index:06d}.png", "split": split,
                           "imgid": imgid, "world_index": index,
                           "labelled": split == "train" and index < c.n_labelled,
                           "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
            imgid, sentid = imgid + 1, sentid + len(refs)
    return {"dataset": "world", "world": c.model_dump(), "images": images}


# -- retriever as an open_clip model directory ----------------------------------------------------------
def export_retriever(retriever, out: str | Path, verify: bool = True) -> Path:
    """Write `retriever` (a raycap Retriever with a HF tokenizer and an open_clip model config in its meta, as
    the world's) as an open_clip model directory. Its tokenizer gets an end-of-text post-processor, so that
    open_clip's own `get_tokenizer("local-dir:...")` appends <eos> (where the argmax pooling reads) as raycap's
    `encode` does; raycap tokenizes with add_special_tokens=False, so its ids are unchanged."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tokenizers.processors import TemplateProcessing

    from raycap.models.clip import OPEN_CLIP_CONFIG, OpenClipTokenizer

    out = Path(out)
    model_cfg = copy.deepcopy(retriever.meta.get("model_cfg"))
    if not isinstance(model_cfg, dict) or isinstance(retriever.tokenizer, OpenClipTokenizer):
        raise UserError(f"retriever {retriever.meta.get('name', '?')}: only a retriever with a HF tokenizer and an "
                        "open_clip model config (the world's) can be exported as an open_clip model directory")
    model_cfg.setdefault("text_cfg", {})["hf_tokenizer_name"] = HF_TOKENIZER_NAME
    mean, std = (list(retriever.meta.get(k) or getattr(open_clip.constants, f"OPENAI_DATASET_{k.upper()}"))
                 for k in ("mean", "std"))  # the values the retriever normalises with (OpenAI's by default)
    preprocess_cfg = {"mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.bin"), *out.glob("*.pth")]:
        stale.unlink()  # open_clip picks one checkpoint file from the directory: only ours may be there
    state = {k: v.detach().cpu().contiguous() for k, v in retriever.model.state_dict().items()}
    save_file(state, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                   indent=2) + "\n")
    tok = copy.deepcopy(retriever.tokenizer)
    if tok.eos_token_id is not None and hasattr(tok, "backend_tokenizer"):
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, tok.eos_token_id)])
    tok.save_pretrained(str(out))
    if verify:
        loaded = open_clip.create_model(f"local-dir:{out}").state_dict()
        bad = sorted(set(loaded) ^ set(state)) or [k for k in state if not torch.equal(loaded[k], state[k])]
        if bad:
            raise RuntimeError(f"{out}: open_clip loads different weights than were written ({bad[:3]})")
    return out


# -- the command ----------------------------------------------------------------------------------------
def parse_splits(text: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits:
        raise UserError("--splits: give one or more of train,val,test")
    for s in splits:
        if s not in EXPORT_SPLITS:
            hint = " (the labelled split is the first n_labelled train images, marked in the JSON)" \
                if s == "labelled" else ""
            raise UserError(f"--splits: unknown split {s!r}; choose from {','.join(EXPORT_SPLITS)}{hint}")
    return [s for s in EXPORT_SPLITS if s in splits]


def load_world_config(world_dir: Path) -> WorldConfig:
    path = world_dir / "world.json"
    if not world_dir.is_dir():
        raise UserError(f"--world-dir {world_dir}: no such directory")
    if not path.is_file():
        raise UserError(f"--world-dir {world_dir}: not a pretrained world directory (missing world.json; build one "
                        "with `python -m raycap.pretrain world --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    return WorldConfig.parse(data, str(path))


def _as_world(data: dict) -> dict | None:
    """A previous export's world settings as `WorldConfig.identity` gives them (None if they are not a world's)."""
    try:
        return WorldConfig.model_validate(data).identity()
    except ValueError:
        return None


def _previous_export_world(out: Path) -> dict | None:
    """The world config of the export in `out`: from its marker file, or from the dataset_world.json of an export
    written before the marker (Karpathy JSON with "dataset": "world" and the world's config); None if `out` holds
    no export."""
    for path, legacy in ((out / MARKER_FILE, False), (out / DATASET_FILE, True)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("world"), dict) and (
                not legacy or (data.get("dataset") == "world" and isinstance(data.get("images"), list))):
            return data["world"]
    return None


def check_export_dir(out: Path, config: WorldConfig) -> None:
    """`out` may be written: absent, empty, or an export of this world (resumed). A directory holding anything
    else is refused, naming what is there: the export would overwrite its README.txt and dataset_world.json and
    delete the weights in its retriever/."""
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    old = _previous_export_world(out)
    if old is None:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise UserError(f"--out {out}: not empty ({shown}) and not a previous export-world output; an export "
                        f"writes {README_FILE}, {DATASET_FILE}, images/ and {RETRIEVER_DIR}/ there, so give a new "
                        "or empty directory")
    if _as_world(old) != config.identity():
        raise UserError(f"{out}: holds an export of a different world; use a new --out")


def export_world(out: str | Path, world_dir: str | Path = SHIPPED_WORLD, splits: Sequence[str] = EXPORT_SPLITS,
                 max_train: int | None = None, workers: int | None = None, command: str | None = None,
                 show_progress: bool = True) -> dict:
    """Export a pretrained world directory's world and retriever as files under `out` (see the module doc).
    Returns a summary: images per split, how many were written now, the paths."""
    from raycap.models.clip import META_FILE, Retriever
    from raycap.paths import check_output_dir

    out, world_dir = Path(out), Path(world_dir)
    check_output_dir(out)
    config = load_world_config(world_dir)
    if not (world_dir / "retriever" / META_FILE).is_file():
        raise UserError(f"--world-dir {world_dir}: missing retriever/{META_FILE} (a pretrained world has one)")
    if max_train is not None and max_train < 1:
        raise UserError(f"--max-train {max_train}: must be >= 1")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    check_export_dir(out, config)
    retriever = Retriever.from_pretrained(world_dir / "retriever")
    world = World(config)
    counts = {s: config.split_size(s) for s in splits}
    if "train" in counts and max_train is not None:
        counts["train"] = min(counts["train"], max_train)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_FILE  # first: an interrupted export is resumed as one
    if not marker.is_file():
        marker.write_text(json.dumps({"world": config.model_dump()}) + "\n")
    written = write_images(world, out, counts, workers, show_progress)
    export_retriever(retriever, out / RETRIEVER_DIR)
    tmp = out / f".{DATASET_FILE}.tmp"
    tmp.write_text(json.dumps(karpathy_json(world, counts)))
    os.replace(tmp, out / DATASET_FILE)
    command = command or f"python -m raycap.data export-world --out {shlex.quote(str(out))}"
    (out / README_FILE).write_text(
        f"The raycap shapes world as files ({world_dir}): images/<split>/NNNNNN.png, {DATASET_FILE} (Karpathy format) "
        f"and {RETRIEVER_DIR}/ (open_clip.create_model('local-dir:{RETRIEVER_DIR}'), HF tokenizer inside).\n"
        f"Written by: {command}\n")
    return {"out": str(out), "images": counts, "written": written, "dataset": str(out / DATASET_FILE),
            "retriever": str(out / RETRIEVER_DIR)}


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m raycap.data", *(shlex.quote(a) for a in args)])


def image_array(path: str | Path) -> np.ndarray:
    """An exported image back as the uint8 (H, W, 3) array `World.image` gave."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
