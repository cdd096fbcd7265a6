"""raycap's Python API: what the commands do, as functions.

    import raycap

    run = raycap.train("world-demo", out="runs/demo", overrides={"rl.steps": 100}, runtime="local")
    run.metrics["p_at_1"], run.dir, run.captioner.caption(["photo.png"])
    metrics = raycap.evaluate(captioner="runs/demo/final", dataset="world:val", decoding="select")
    captioner = raycap.load_captioner("runs/demo/final")
    captioner.caption([PIL.Image.open("a.png"), "b.jpg"])

User mistakes raise `raycap.errors.UserError` (a ValueError) with the same one-line message the commands print.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """A finished training run: its directory, its final (test) metrics and config; `captioner` loads the final
    captioner (RUN/final) on first use."""

    dir: Path
    metrics: dict
    config: Any
    _captioner: "Captioner | None" = field(default=None, repr=False)

    @property
    def captioner(self) -> "Captioner":
        if self._captioner is None:
            self._captioner = load_captioner(self.dir / "final", retriever=self.config.retriever)
        return self._captioner

    @property
    def report(self) -> Path | None:
        page = self.dir / "report" / "index.html"
        return page if page.is_file() else None


def run_config(config="world-demo", overrides: dict | None = None):
    """A `RunConfig` from a named config, a YAML path, a dict of sections or a RunConfig, with `overrides`
    ({"rl.algorithm.kl_coef": 0.3}: dotted keys as `--set` takes them) applied and the whole validated."""
    from pydantic import ValidationError

    from raycap.config import RunConfig, check_override_key, load_config, set_dotted
    from raycap.errors import UserError, format_validation_error

    overrides = dict(overrides or {})
    if isinstance(config, (str, Path)):
        return load_config(str(config), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    if isinstance(config, RunConfig):
        data = config.model_dump(mode="json")
    elif isinstance(config, dict):
        data = json.loads(json.dumps(config))  # a deep copy: the caller's dict is left as it was
    else:
        raise UserError(f"config: expected a config name, a YAML path, a dict or a RunConfig, got "
                        f"{type(config).__name__}")
    for key, value in overrides.items():
        check_override_key(key)
        set_dotted(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "config")) from None


def train(config="world-demo", out: str | Path | None = None, overrides: dict | None = None, runtime: str = "ray",
          resume_with_new_config: bool = False) -> Run:
    """One RL run, as `raycap train`: `config` a named config, YAML path, dict or RunConfig; `out` the run dir
    (resumed when it holds checkpoints); `runtime` "ray" or "local" (the single-process reference loop)."""
    from raycap.errors import UserError
    from raycap.paths import check_output_dir
    from raycap.train import execute

    if out is None:
        raise UserError("out: a run directory is required")
    if runtime not in ("ray", "local"):
        raise UserError(f"runtime {runtime!r}: expected 'ray' or 'local'")
    out = Path(out)
    check_output_dir(out, "out")
    cfg = run_config(config, overrides)
    final = execute(cfg, out, runtime, resume_with_new_config)
    return Run(out, final, cfg)


def evaluate(captioner: str | Path | None = None, captions: str | Path | None = None, dataset: str = "world:test",
             **options) -> dict:
    """The metrics `raycap evaluate` computes, as a dict: of a captioner dir or of a COCO results file
    (`captions`) on `dataset`. `options` are the command's other flags by their Python names (decoding="beam",
    num_beams=5, images=1000, image_root=..., retriever_name="ViT-B-32", pretrained="openai", save_captions=...,
    json=...; see `raycap evaluate --help`)."""
    from raycap.errors import UserError
    from raycap.evaluate import build_parser, run_evaluation

    if (captioner is None) == (captions is None):
        raise UserError("evaluate: give one of captioner (a captioner dir) or captions (a COCO results file)")
    argv = ["--dataset", dataset] + (["--captioner", str(captioner)] if captioner is not None else
                                      ["--captions", str(captions)])
    flags = {a.dest: a for a in build_parser()._actions
             if a.option_strings and a.dest not in ("captioner", "captions", "dataset", "help")}  # given above
    for key, value in options.items():
        action = flags.get(key)
        if action is None:
            raise UserError(f"evaluate: unknown option {key!r}; options: {', '.join(sorted(flags))}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return run_evaluation(build_parser().parse_args(argv))


class Captioner:
    """A captioner dir loaded with the retriever whose image embeddings it reads, on one device:
    `caption(images)` for PIL images or image paths."""

    def __init__(self, path: Path, model, tokenizer, retriever, device):
        self.path, self.model, self.tokenizer, self.retriever, self.device = path, model, tokenizer, retriever, device

    def caption(self, images, decoding: str = "greedy", num_beams: int = 5, batch_size: int = 512) -> list[str]:
        """One caption per image (a PIL image, or a path read with PIL); `decoding` greedy or beam."""
        from raycap.caption import caption_images
        from raycap.data.sources import load_image
        from raycap.errors import UserError

        if decoding not in ("greedy", "beam"):
            raise UserError(f"decoding {decoding!r}: expected 'greedy' or 'beam'")
        if isinstance(images, (str, Path)) or hasattr(images, "convert"):
            raise UserError("caption: expects a list of images (PIL images or paths), got one image")
        loaded = [load_image(Path(i)) if isinstance(i, (str, Path)) else i.convert("RGB") for i in images]
        return caption_images(self.model, self.tokenizer, self.retriever, loaded, decoding, num_beams, batch_size)

    def __repr__(self) -> str:
        return f"Captioner({str(self.path)!r}, device={self.device})"


def load_captioner(path: str | Path, retriever=None, retriever_name: str | None = None,
                   pretrained: str | None = None, device: str = "auto") -> Captioner:
    """A captioner dir (a run's RUN/final, the shipped world captioner, a `raycap convert` output) ready to
    caption images. `retriever`: a retriever dir (default: the shipped world retriever) or a RetrieverConfig;
    or `retriever_name` + `pretrained` (open_clip); `device`: auto, cpu, cuda, cuda:N."""
    from argparse import Namespace

    from raycap.config import WORLD_DIR, RetrieverConfig
    from raycap.errors import UserError
    from raycap.inputs import captioner_on_device, check_retriever_arguments, load_retriever, retriever_from_arguments

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"captioner {path}: no such directory")
    if isinstance(retriever, RetrieverConfig):
        model, label = load_retriever(retriever), str(retriever.path or retriever.name)
    else:
        args = Namespace(retriever=None if retriever is None else Path(retriever), retriever_name=retriever_name,
                         pretrained=pretrained)
        check_retriever_arguments(args)
        model, label = retriever_from_arguments(args, WORLD_DIR / "retriever")
    captioner, tokenizer, model, where = captioner_on_device(path, model, f"captioner {path}", label, device)
    return Captioner(path, captioner, tokenizer, model, where)
