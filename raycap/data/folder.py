"""A folder of images (recursive, sorted by relative path), unlabelled unless a captions JSONL gives
`{"file": "relative/path.jpg", "caption": "..."}` (or `"captions": [...]`) lines."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource, Record
from raycap.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_folder(path: str | Path, captions: str | Path | None = None) -> tuple[FileSource, list[Skipped]]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such image folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{path}: no images ({', '.join(sorted(EXTENSIONS))})")
    rel = [p.relative_to(path).as_posix() for p in files]
    refs = _captions(Path(captions), set(rel)) if captions else {}
    records = [Record(r, p, refs.get(r, [])) for r, p in zip(rel, files)]
    return FileSource(f"folder:{path.name}", records, labelled=bool(captions)), []


def _captions(path: Path, known: set[str]) -> dict[str, list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    out = defaultdict(list)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}: line {n}: not valid JSON ({e})") from None
        if not isinstance(item, dict) or "file" not in item or not ("caption" in item or "captions" in item):
            raise UserError(f"{path}: line {n}: expected {{\"file\": ..., \"caption\": ...}}")
        if item["file"] not in known:
            raise UserError(f"{path}: line {n}: {item['file']!r} is not an image of the folder")
        caps = item.get("captions", [item.get("caption")])
        out[item["file"]] += [str(c).strip() for c in caps if str(c).strip()]
    return out
