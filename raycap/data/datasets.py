"""Opening a dataset on disk by kind (karpathy, coco, cc, nocaps, folder): one call for the run config's `data`
section and one string form for command lines (`karpathy:PATH[:split]`, ...)."""
from __future__ import annotations

from pathlib import Path

from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource
from raycap.errors import UserError

KINDS = ("world", "karpathy", "coco", "cc", "nocaps", "folder")
SPEC_FORMS = ("world:SPLIT", "karpathy:DATASET.json[:SPLIT]", "coco:ANNOTATIONS.json[:IMAGE_ROOT]",
              "cc:FILE.tsv[:IMAGE_ROOT]", "nocaps:ANNOTATIONS.json[:IMAGE_ROOT]", "folder:DIR[:CAPTIONS.jsonl]")


def _file_and_dir(base: Path, split: str, image_root: str | None) -> tuple[Path, Path]:
    """`FILE[:IMAGE_DIR]` of a coco/nocaps/cc split: FILE relative to `base` (a dir, or a file's dir), IMAGE_DIR
    relative to `image_root` (default: that dir)."""
    file, _, images = split.partition(":")
    folder = base if base.is_dir() else base.parent
    file_path = Path(file) if Path(file).is_absolute() else folder / file
    images_base = Path(image_root) if image_root else folder
    return file_path, (images_base / images if images else images_base)


def open_files(kind: str, path: str, split, image_root: str | None = None, captions: str | None = None,
               on_bad_image: str = "error", require_references: bool = False) -> tuple[FileSource, list[Skipped]]:
    """The images of one split of a dataset on disk, and the items left out."""
    base = Path(path)
    if kind == "karpathy":
        from raycap.data.karpathy import read_karpathy

        source, skipped = read_karpathy(base, split, image_root, on_bad_image)
    elif kind in ("coco", "nocaps", "cc"):
        if not isinstance(split, str):
            raise UserError(f"data.splits: a {kind} split is one annotation file (FILE[:IMAGE_DIR]), got {split!r}")
        file, images = _file_and_dir(base, split, image_root)
        if kind == "coco":
            from raycap.data.coco import read_coco

            source, skipped = read_coco(file, images, on_bad_image)
        elif kind == "nocaps":
            from raycap.data.nocaps import read_nocaps

            source, skipped = read_nocaps(file, images, on_bad_image)
        else:
            from raycap.data.conceptual import read_conceptual

            source, skipped = read_conceptual(file, images, on_bad_image)
    elif kind == "folder":
        from raycap.data.folder import read_folder

        if not isinstance(split, str):
            raise UserError(f"data.splits: a folder split is one subfolder, got {split!r}")
        source, skipped = read_folder(base / split, captions)
    elif kind == "world":
        raise ValueError("the world is not a dataset on disk: use raycap.data.sources.WorldSource")
    else:
        raise UserError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    if require_references:
        from raycap.data.readers_common import require_references as check

        check(source.records, base)
    return source, skipped


def parse_dataset_spec(spec: str, image_root: str | Path | None = None) -> dict:
    """`kind:PATH[:extra]` -> keyword arguments of `open_files` (or {"kind": "world", "split": ...}); `image_root`
    (a command's `--image-root`) is where a karpathy/coco/nocaps/cc dataset's image paths start, in place of the
    annotation file's dir or the spec's IMAGE_ROOT."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest:
        raise UserError(f"dataset {spec!r}: expected one of {', '.join(SPEC_FORMS)}")
    if kind == "world":
        return {"kind": "world", "split": rest}
    path, _, extra = rest.partition(":")
    root = None if image_root is None else str(image_root)
    if kind == "karpathy":
        return {"kind": kind, "path": path, "split": extra or "test"} | ({"image_root": root} if root else {})
    if kind == "folder":
        return {"kind": kind, "path": path, "split": ".", "captions": extra or None}
    return {"kind": kind, "path": path, "split": Path(path).name, "image_root": root or extra or None}
