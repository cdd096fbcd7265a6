"""Load a pretrained world directory (`python -m raycap.pretrain world --out DIR`): its world config, the
frozen retriever and the supervised captioner with its tokenizer."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raycap.data.world import World, WorldConfig
from raycap.errors import UserError
from raycap.models.clip import Retriever
from raycap.models.clipcap import CONFIG_NAME as CLIPCAP_CONFIG
from raycap.models.clipcap import ClipCap
from raycap.models.tokenizers import load_tokenizer


@dataclass
class PretrainedWorld:
    world: World
    retriever: Retriever
    captioner: ClipCap
    tokenizer: object
    path: Path


def load_captioner_model(path: str | Path):
    """The captioner (any implementation of `raycap.models.captioner.Captioner`) saved in a directory."""
    from raycap.models.captioner import captioner_kind

    path = Path(path)
    kind = captioner_kind(path)
    if kind == "clipcap":
        return ClipCap.from_pretrained(path)
    if kind == "blip":
        from raycap.models.blip import BlipCaptioner

        return BlipCaptioner.from_pretrained(path)
    raise UserError(f"{path} is not a raycap captioner directory: no {CLIPCAP_CONFIG} (ClipCap) or "
                    "raycap_blip.json (BLIP) in it")


def load_captioner(path: str | Path) -> tuple[ClipCap, object]:
    """(captioner, its tokenizer) of a raycap captioner directory (`save_pretrained` + `tokenizer/`)."""
    path = Path(path)
    if not (path / "tokenizer").is_dir():
        raise UserError(f"{path} is not a raycap captioner directory: missing tokenizer/")
    return load_captioner_model(path), load_tokenizer(path / "tokenizer")


def load_world_dir(path: str | Path, captioner: str | Path | None = None) -> PretrainedWorld:
    path = Path(path)
    if not (path / "world.json").is_file():
        raise UserError(f"{path} is not a pretrained world directory: missing world.json "
                        "(build one with `python -m raycap.pretrain world --out DIR`)")
    world = World(WorldConfig.parse(json.loads((path / "world.json").read_text()), str(path / "world.json")))
    retriever = Retriever.from_pretrained(path / "retriever").freeze()
    cap, tok = load_captioner(captioner or path / "captioner")
    return PretrainedWorld(world, retriever, cap, tok, path)
