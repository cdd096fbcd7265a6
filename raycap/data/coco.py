"""COCO caption annotation files (`captions_train2017.json`, ...) and nocaps (the same layout): `images` with
`id` and `file_name`, `annotations` with `image_id` and `caption`, images under an image root."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from raycap.data.readers_common import check_images, field, read_json
from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource, Record
from raycap.errors import UserError


def read_coco(path: str | Path, image_root: str | Path | None = None, on_bad_image: str = "error",
              kind: str = "coco", require_references: bool = True) -> tuple[FileSource, list[Skipped]]:
    """Images ordered by id with their captions. A file without annotations (nocaps' test split) gives an
    unlabelled source unless `require_references`."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a COCO-style caption file (expected an object with an 'images' list)")
    annotations = data.get("annotations") or []
    refs = defaultdict(list)
    for k, a in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        caption = field(a, "caption", where)
        refs[field(a, "image_id", where)].append(str(caption).strip())
    root = Path(image_root) if image_root else path.parent
    records = []
    for k, item in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        ident, name = field(item, "id", where), field(item, "file_name", where)
        records.append(Record(str(ident), root / name, refs.get(ident, []),
                              {key: v for key, v in item.items() if key not in ("id", "file_name")}))
    records.sort(key=lambda r: (len(r.id), r.id))
    labelled = bool(annotations)
    if labelled or require_references:
        for r in records:
            if not r.references:
                raise UserError(f"{path}: image {r.id!r} has no captions in 'annotations'")
    records, skipped = check_images(records, on_bad_image, path)
    return FileSource(f"{kind}:{path.name}", records, labelled), skipped
