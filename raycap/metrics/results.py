"""Captions in COCO results format, `[{"image_id": ..., "caption": ...}]`: what `raycap evaluate --save-captions`
and a run's `final_captions.json` write, and what `--captions` and the COCO / nocaps evaluation servers read."""
from __future__ import annotations


def coco_results(ids: list[str], captions: list[str]) -> list[dict]:
    """One entry per image under the dataset's own id (COCO's and nocaps' integer ids stay integers)."""
    if len(ids) != len(captions):
        raise ValueError(f"{len(ids)} image ids for {len(captions)} captions")
    return [{"image_id": int(i) if str(i).isdigit() else i, "caption": c} for i, c in zip(ids, captions)]
