"""Conceptual Captions TSV: `caption<TAB>image path` per line (the path relative to the image root). Downloads of
CC are always partial, so rows whose image is absent are left out, counted and reported."""
from __future__ import annotations

from pathlib import Path

from raycap.data.readers_common import check_images
from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource, Record
from raycap.errors import UserError


def read_conceptual(path: str | Path, image_root: str | Path | None = None,
                    on_bad_image: str = "error") -> tuple[FileSource, list[Skipped]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    root = Path(image_root) if image_root else path.parent
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UserError(f"{path}: line {n}: expected 'caption<TAB>image path', got {len(parts)} field(s)"
                            + (" with an empty one" if len(parts) == 2 else ""))
        caption, rel = parts[0].strip(), parts[1].strip()
        records.append(Record(rel, root / rel, [caption]))
    if not records:
        raise UserError(f"{path}: no rows")
    records, skipped = check_images(records, on_bad_image, path, always_skip=True)
    if not records:
        raise UserError(f"{path}: none of its {len(skipped)} images is under {root}")
    return FileSource(f"cc:{path.name}", records, labelled=True), skipped
