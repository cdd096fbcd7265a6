"""nocaps (`nocaps_val_4500_captions.json`, `nocaps_test_image_info.json`): COCO-style JSON; the test split has
no public captions, so it reads as an unlabelled source."""
from __future__ import annotations

from pathlib import Path

from raycap.data.coco import read_coco
from raycap.data.skipped import Skipped
from raycap.data.sources import FileSource


def read_nocaps(path: str | Path, image_root: str | Path | None = None,
                on_bad_image: str = "error") -> tuple[FileSource, list[Skipped]]:
    return read_coco(path, image_root, on_bad_image, kind="nocaps", require_references=False)
