"""What every dataset reader shares: reading a JSON file with one-line errors, resolving image paths, and
checking that the images exist (a stat per file; decoding is the embedding cache's job)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from raycap.data.skipped import Skipped
from raycap.data.sources import BadImage, Record
from raycap.errors import UserError


def read_json(path: Path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def field(item: dict, name: str, where: str):
    """item[name], or a one-line error naming the file, the item and the field."""
    if not isinstance(item, dict) or name not in item:
        raise UserError(f"{where}: missing field {name!r}")
    return item[name]


def check_images(records: list[Record], on_bad_image: str, source_file: Path,
                 always_skip: bool = False) -> tuple[list[Record], list[Skipped]]:
    """The records whose image file exists; the others raise `BadImage` (on_bad_image "error") or are returned
    as skipped ("skip", or `always_skip` for datasets that are partial by nature, like Conceptual Captions).
    "ignore" keeps every record unchecked: for uses that read the annotations and never an image
    (`raycap.evaluate --text-only`)."""
    if on_bad_image == "ignore":
        return list(records), []
    kept, missing = [], []
    for r in records:
        (kept if os.path.isfile(r.path) else missing).append(r)
    if missing and on_bad_image == "error" and not always_skip:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise BadImage(f"{missing[0].path}: image file not found, listed in {source_file}{more}; "
                       f"{BadImage.SKIP} to leave missing images out")
    return kept, [Skipped(r.id, str(r.path), "missing") for r in missing]


def require_references(records: list[Record], source_file: Path) -> None:
    for r in records:
        if not r.references:
            raise UserError(f"{source_file}: image {r.id!r} has no reference captions, and this use needs them")


def resolve(base: Path, path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else base / p
