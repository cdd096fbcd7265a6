"""Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`, and raycap's `dataset_world.json`):
one entry per image with its `split` (train, restval, val, test), `filepath`/`filename` and `sentences`."""
from __future__ import annotations

from pathlib import Path

from raycap.data.readers_common import check_images, field, read_json
from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource, Record
from raycap.errors import UserError

KNOWN = {"filepath", "filename", "split", "sentences", "sentids", "imgid", "cocoid"}


def read_karpathy(path: str | Path, split: str | list[str], image_root: str | Path | None = None,
                  on_bad_image: str = "error") -> tuple[FileSource, list[Skipped]]:
    """The images of `split` (a name or a list of names) with their references. Image paths are
    image_root/filepath/filename (image_root defaults to the JSON's directory)."""
    path = Path(path)
    names = [split] if isinstance(split, str) else list(split)
    data = read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: not a Karpathy-split file (expected an object with an 'images' list)")
    root = Path(image_root) if image_root else path.parent
    records = []
    for k, item in enumerate(images):
        where = f"{path}: images[{k}]"
        if field(item, "split", where) not in names:
            continue
        filename = field(item, "filename", where)
        sentences = field(item, "sentences", where)
        if not isinstance(sentences, list):
            raise UserError(f"{where}: 'sentences' must be a list")
        refs = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise UserError(f"{where}.sentences[{j}]: missing field 'raw'")
            if raw.strip():
                refs.append(raw.strip())
        ident = str(item.get("cocoid", item.get("imgid", filename)))
        extra = {key: v for key, v in item.items() if key not in KNOWN} | {"split": item["split"]}
        records.append(Record(ident, root / item.get("filepath", "") / filename, refs, extra))
    if not records:
        present = sorted({str(i.get("split")) for i in images if isinstance(i, dict)})
        raise UserError(f"{path}: split {split!r} selects no images (splits present: {', '.join(present)})")
    records, skipped = check_images(records, on_bad_image, path)
    source = FileSource(f"karpathy:{path.name}:{'+'.join(names)}", records, labelled=True)
    source.world_config = data.get("world")
    return source, skipped
