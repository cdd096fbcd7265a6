"""Load a captioner directory of any kind, and a pretrained world directory (`python -m raycap.pretrain world
--out DIR`): its world config, the frozen retriever and the supervised captioner with its tokenizer.

The kinds of captioner are one registry, `CAPTIONERS` (kind -> the config file its `save_pretrained` writes, by
which a directory is recognised, and its class): it sits here, above the implementations, so the protocol
(`raycap.models.captioner`) and the decoding they share import none of them. A new captioner is its module
(implementing `raycap.models.captioner.Captioner`) and its line here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raycap.data.world import World, WorldConfig
from raycap.errors import UserError
from raycap.models import blip, clipcap, vlm
from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap
from raycap.models.tokenizers import load_tokenizer


@dataclass(frozen=True)
class CaptionerKind:
    config_file: str  # what `save_pretrained` writes: a directory holding it is of this kind
    cls: type         # its `from_pretrained(path)` loads the directory
    label: str        # its name in messages


CAPTIONERS: dict[str, CaptionerKind] = {  # kind -> how to recognise and load it (checked in this order)
    "clipcap": CaptionerKind(clipcap.CONFIG_NAME, clipcap.ClipCap, "ClipCap"),
    "blip": CaptionerKind(blip.CONFIG_NAME, blip.BlipCaptioner, "BLIP"),
    "vlm": CaptionerKind(vlm.CONFIG_NAME, vlm.VlmCaptioner, "vision-language model"),
}


@dataclass
class PretrainedWorld:
    world: World
    retriever: Retriever
    captioner: ClipCap
    tokenizer: object
    path: Path


def captioner_kind(path: str | Path) -> str | None:
    """Which kind of captioner a directory holds, from its config file (None: not a captioner dir)."""
    return next((name for name, kind in CAPTIONERS.items() if (Path(path) / kind.config_file).is_file()), None)


def required_captioner_kind(path: str | Path) -> str:
    """A directory's captioner kind, or one line saying it holds none."""
    kind = captioner_kind(path)
    if kind is None:
        files = " or ".join(f"{k.config_file} ({k.label})" for k in CAPTIONERS.values())
        raise UserError(f"{path} is not a raycap captioner directory: no {files} in it")
    return kind


def load_captioner_model(path: str | Path):
    """The captioner (any implementation of `raycap.models.captioner.Captioner`) saved in a directory."""
    path = Path(path)
    return CAPTIONERS[required_captioner_kind(path)].cls.from_pretrained(path)


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
