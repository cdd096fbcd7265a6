"""The configuration reference, generated from raycap's pydantic models.

`docs/hooks.py` calls `render()` while mkdocs builds the site and puts its output where
`docs/reference/config.md` has the `<!-- config-reference -->` marker, so the page is rebuilt from the code on
every build and cannot drift from it. `python docs/gen_config_reference.py` prints the same Markdown.

It only reads the models (`model_fields`, their annotations, defaults, constraints and descriptions) and the
named configs and search spaces shipped in the package; it imports neither torch nor Ray.
"""
from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's raycap, the one these docs describe
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- config-reference -->"


def _models():
    from pydantic import BaseModel

    from raycap.config import RunConfig, section_model
    from raycap.data.world import WorldConfig
    from raycap.search.space import SearchSettings
    from raycap.supervised.captioner_stage import CaptionerStageConfig

    return BaseModel, section_model, RunConfig, CaptionerStageConfig, WorldConfig, SearchSettings


def submodel(annotation):
    """The pydantic model a field holds (`Model` or `Model | None`), or None for a plain setting."""
    BaseModel, section_model = _models()[:2]
    sub = section_model(annotation)
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def sections(model, prefix: str = "") -> list[tuple[str, type]]:
    """[(dotted section name, model)] of `model` and every section below it, depth first ('' is the top level)."""
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            out += sections(sub, f"{prefix}{name}.")
    return [(p.rstrip("."), m) for p, m in out]


def settings(model) -> list[tuple[str, object]]:
    """[(field name, FieldInfo)] of `model`'s own settings (not its sub-sections)."""
    return [(n, f) for n, f in model.model_fields.items() if submodel(f.annotation) is None]


def type_text(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_yaml(a)}`" for a in args)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or `null`" if type(None) in args else text
    if origin in (list, tuple, set):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if annotation is type(None):
        return "`null`"
    BaseModel = _models()[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(annotation, str(annotation))


def _relative(value):
    """Paths inside the checkout as the repository writes them (raycap/assets/world/captioner)."""
    if isinstance(value, str) and value.startswith(str(ROOT) + "/"):
        return value[len(str(ROOT)) + 1:]
    return value


def _yaml(value) -> str:
    value = _relative(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def default_text(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    BaseModel = _models()[0]
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list) and len(json.dumps(value)) > 60:
        return f"a list of {len(value)}"
    return f"`{_yaml(value)}`"


def constraint_text(field) -> str:
    marks = []
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least", "max_length": "at most"}
    for meta in field.metadata:
        for attr, word in names.items():
            value = getattr(meta, attr, None)
            if value is not None:
                marks.append(f"{word} {value}" + (" items" if "length" in attr else ""))
        if getattr(meta, "pattern", None):
            marks.append(f"matches `{meta.pattern}`")
    return ", ".join(marks)


def _cell(text: str) -> str:
    """One table cell: on one line, its pipes escaped outside code spans (inside them Markdown keeps them)."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def section_table(prefix: str, model) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in settings(model):
        key = f"{prefix}.{name}" if prefix else name
        kind = type_text(field.annotation)
        limits = constraint_text(field)
        if limits:
            kind += f" ({limits})"
        rows.append(f"| `{key}` | {_cell(kind)} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
    return rows


def _doc(model) -> str:
    return " ".join((model.__doc__ or "").split())


def model_reference(model, title: str, level: int = 3, base: str = "") -> list[str]:
    """A heading and a table per section of `model` (its own settings first), its keys under `base` (a dotted
    prefix); the top level's docstring is left to the caller, which says it above."""
    out = []
    for prefix, sub in sections(model, f"{base}." if base else ""):
        heading = f"`{prefix}`" if prefix else title
        out += ["", "#" * level + " " + heading, ""]
        if _doc(sub) and prefix:
            out += [_doc(sub), ""]
        subs = [f"`{prefix + '.' if prefix else ''}{n}`" for n, f in sub.model_fields.items()
                if submodel(f.annotation) is not None]
        if subs:
            out += ["Sections: " + ", ".join(subs) + ".", ""]
        if settings(sub):
            out += section_table(prefix, sub)
    return out


def _first_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    return text.split(". ")[0].split(": - ")[0].rstrip(".") if text else ""


def named_configs_table() -> list[str]:
    from raycap.config import CONFIG_DIR

    rows = ["| name | what it is (the file's own header) |", "| --- | --- |"]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        rows.append(f"| `{path.stem}` | {_cell(_first_comment(path))} |")
    return rows


def named_spaces_table() -> list[str]:
    import yaml

    from raycap.search.space import SPACE_DIR

    rows = ["| name | description |", "| --- | --- |"]
    for path in sorted(SPACE_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        rows.append(f"| `{path.stem}` | {_cell(str(data.get('description') or _first_comment(path)))} |")
    return rows


def render() -> str:
    _, _, RunConfig, CaptionerStageConfig, WorldConfig, SearchSettings = _models()
    out = ["<!-- generated by docs/gen_config_reference.py from raycap's pydantic models; do not edit -->", "",
           "## The run config (`raycap train`, `raycap card --config`, `raycap tune`)", "",
           f"`{RunConfig.__module__}.{RunConfig.__name__}`. " + _doc(RunConfig), "",
           "Every key below can be set with `--set KEY=VALUE` (the value is YAML) or in a YAML config under its "
           "section.", ""]
    out += ["### Named configs", "", "`--config NAME` (files in `raycap/configs/`):", ""] + named_configs_table()
    out += model_reference(RunConfig, "Top level")
    out += ["", "## The supervised captioner stage (`raycap pretrain captioner --config FILE.yaml`)", "",
            f"`{CaptionerStageConfig.__module__}.{CaptionerStageConfig.__name__}`; `data` and `retriever` are the "
            "run config's sections above (its default `data.splits.train` is the world's `labelled` split)."]
    stage = [line for line in model_reference(CaptionerStageConfig, "Top level (stage)")]
    out += _drop_sections(stage, ("data", "retriever"))
    out += ["", "## The shapes world (`raycap pretrain world --world-config FILE.yaml` or `--set KEY=VALUE`)", "",
            f"`{WorldConfig.__module__}.{WorldConfig.__name__}`, written to `world.json` of a world dir."]
    out += model_reference(WorldConfig, "World settings")
    out += ["", "## Search spaces (`raycap tune --space NAME_OR_FILE`)", "",
            "A space's top-level keys: `config` (the run config its trials start from), `set` (fixed run config "
            "settings), `params` (the searched keys: `loguniform` / `uniform` [low, high], `randint` [low, high), "
            "`choice` [values]; `relative: true` multiplies the bounds by the config's own value), `search` (below) "
            "and `description`.", "", "### Named spaces", "", "Files in `raycap/tune_spaces/`:", ""]
    out += named_spaces_table()
    out += model_reference(SearchSettings, "`search`", base="search")
    return "\n".join(out) + "\n"


def _drop_sections(lines: list[str], names: tuple[str, ...]) -> list[str]:
    """`lines` without the headings and tables of these sections (documented once, under the run config)."""
    out, skipping = [], False
    for line in lines:
        if line.startswith("### "):
            name = line[4:].strip("`")
            skipping = name in names or any(name.startswith(n + ".") for n in names)
        if not skipping:
            out.append(line)
    return out


if __name__ == "__main__":
    print(render(), end="")
