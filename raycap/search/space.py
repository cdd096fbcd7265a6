"""Search spaces for `python -m raycap.tune`: YAML files in `raycap/tune_spaces/` (also `tune_spaces/` at the
top of the repository) or any path, checked against the run config before anything starts.

A space names the run config its trials start from, fixed settings every trial gets, the parameters to
search and how to search them:

    config: world-demo                 # named run config or YAML path (relative to the space file)
    set: {rl.steps: 150, eval.every: 25}
    params:
      rl.optimiser.lr: {loguniform: [0.3, 3.0], relative: true}   # bounds times the config's own value
      rl.algorithm.kl_coef: {loguniform: [0.03, 1.0]}
      rl.reward.kind: {choice: [discriminative, accuracy]}
      rl.reward.hard_distractors: {choice: [0, 5, 10]}
      baseline:                        # a choice among sets of settings (a label, not a config key)
        choice: [{rl.algorithm.baseline: mean}, {rl.algorithm.baseline: loo, rl.sampling.num_samples: 4}]
    search: {num_samples: 8, max_concurrent: 2, grace_period: 50, reduction_factor: 2}

Kinds: `loguniform` / `uniform` [low, high] (floats), `randint` [low, high) (integers), `choice` [values].
Every mistake (an unknown key, a bad range, a value a field does not allow) is one `UserError` line naming
the file and the key. Pure Python: the Tune domains are made in `raycap.runtime.tuning`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raycap.config import RunConfig, check_override_key, load_config, read_yaml_mapping
from raycap.errors import UserError, format_validation_error

SPACE_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"
KINDS = ("loguniform", "uniform", "randint", "choice")
TOP_KEYS = ("config", "set", "params", "search", "description")


class SearchSettings(BaseModel):
    """How the space is searched (random search over `params`, ASHA on the objective)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_samples: int = Field(8, ge=1, description="trials drawn from the space")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    grace_period: int = Field(50, ge=1, description="ASHA: updates every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at a rung")
    trial_runtime: Literal["local", "ray"] = Field("local", description="local: the reference loop inside the "
                                                   "trial; ray: the Ray runtime's actors in the trial's placement "
                                                   "group (raycap.runtime.tuning)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of a local trial")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs of a local trial")
    seed: int = Field(0, description="seed of the random search (which configs are drawn)")


class Param(BaseModel):
    """One searched parameter: its Tune kind and arguments; `settings` is what each choice sets."""

    name: str
    kind: Literal["loguniform", "uniform", "randint", "choice"]
    args: list
    relative: bool = False

    def values_to_check(self) -> list:
        """The values whose settings must make a valid run config: every choice, or a range's ends."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]  # Tune's randint excludes high
        return list(self.args)

    def settings(self, value) -> dict:
        """The config fields a drawn `value` sets."""
        return dict(value) if isinstance(value, dict) else {self.name: value}


class SearchSpace(BaseModel):
    path: str
    config: str
    fixed: dict
    params: list[Param]
    search: SearchSettings
    description: str = ""

    def base_config(self, config: str | None = None) -> RunConfig:
        """The run config of every trial before its drawn values: `config` (the CLI's `--config`, which replaces
        the space's own) with the space's fixed settings."""
        return load_config(config or self.config, [f"{k}={_yaml(v)}" for k, v in self.fixed.items()])

    def trial_config(self, drawn: dict, base: dict) -> RunConfig:
        """The run config of a trial: `base` (a `base_config` dumped as JSON) with the settings its drawn
        `{param: value}` make."""
        base = json.loads(json.dumps(base))  # a deep copy
        for name, value in drawn.items():
            for key, v in self.param(name).settings(value).items():
                _set(base, key, v)
        try:
            return RunConfig.model_validate(base)
        except ValidationError as e:
            raise UserError(f"{self.path}: the drawn values {drawn} make an invalid run config: "
                            + format_validation_error(e)) from None

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def _yaml(value) -> str:
    return json.dumps(value)  # JSON is YAML: parse_overrides reads it back as the same value


def _set(data: dict, dotted: str, value) -> None:
    *sections, last = dotted.split(".")
    for s in sections:
        data = data.setdefault(s, {})
    data[last] = value


def named_spaces() -> list[str]:
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def find_space(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix or path.is_file():
        if not path.is_file():
            raise UserError(f"--space {name_or_path}: no such file")
        return path
    named = SPACE_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise UserError(f"unknown search space {name_or_path!r}; named spaces: {', '.join(named_spaces())}, or give "
                        "a YAML path")
    return named


def load_space(name_or_path: str, config: str | None = None, overrides: list[str] = ()) -> SearchSpace:
    """Read and check a search space; `config` (the CLI's `--config`) replaces the run config it names, and
    `overrides` (`KEY=VALUE`) set `search.*` settings or fix run config fields for every trial."""
    from raycap.config import parse_overrides

    path = find_space(name_or_path)
    data = read_yaml_mapping(path)
    where = str(path)
    for key, value in parse_overrides(list(overrides)):
        if key.startswith("search."):
            if not isinstance(data.get("search") or {}, dict):
                raise UserError(f"{where}: search: a mapping of settings")
            data["search"] = dict(data.get("search") or {}) | {key.split(".", 1)[1]: value}
        else:
            if not isinstance(data.get("set") or {}, dict):
                raise UserError(f"{where}: set: a mapping of config keys to values")
            data["set"] = dict(data.get("set") or {}) | {key: value}
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"{where}: unknown key {key!r}; a space has {', '.join(TOP_KEYS)}")
    base_name = config or data.get("config")
    if not isinstance(base_name, str) or not base_name:
        raise UserError(f"{where}: config: name the run config the trials start from (a named config or a path)")
    if config is None and Path(base_name).suffix and not Path(base_name).is_absolute():
        base_name = str((path.parent / base_name).resolve())  # a path in the file is relative to the file
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{where}: set: a mapping of config keys to values, not a {type(fixed).__name__}")
    for key in fixed:
        _check_key(where, f"set.{key}", key)
    try:
        search = SearchSettings.model_validate(data.get("search") or {})
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"{where}: search")) from None
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: params: a mapping of parameters to search, at least one")
    space = SearchSpace(path=where, config=base_name, fixed=dict(fixed), params=[], search=search,
                        description=str(data.get("description", "")))
    try:
        base = space.base_config()
    except UserError as e:
        raise UserError(f"{where}: config/set: {e}") from None
    for name, spec in raw.items():
        space.params.append(_param(where, str(name), spec, base))
    return space


FIXED_PER_SEARCH = ("data.", "retriever.")  # the images and their embeddings are opened once per search


def _check_searchable(where: str, label: str, key: str) -> None:
    if str(key).startswith(FIXED_PER_SEARCH):
        raise UserError(f"{where}: {label}: {key} cannot vary between trials (a search opens the images and their "
                        "retriever embeddings once); run one search per dataset or retriever")


def _check_key(where: str, label: str, key: str) -> None:
    try:
        check_override_key(str(key))
    except UserError as e:
        raise UserError(f"{where}: {label}: " + str(e).split(": ", 1)[1]) from None


def _param(where: str, name: str, spec, base: RunConfig) -> Param:
    label = f"params.{name}"
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise UserError(f"{where}: {label}: give exactly one of {', '.join(KINDS)} (e.g. {{loguniform: [1e-4, 1e-3]}})")
    kind = next(k for k in spec if k in KINDS)
    extra = set(spec) - {kind, "relative"}
    if extra:
        raise UserError(f"{where}: {label}: unknown key {sorted(extra)[0]!r} (a parameter has {kind} and, for "
                        "ranges, relative)")
    args, relative = spec[kind], spec.get("relative", False)
    if not isinstance(relative, bool):
        raise UserError(f"{where}: {label}.relative: true or false, not {relative!r}")
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {label}.{kind}: a non-empty list")
    grouped = kind == "choice" and all(isinstance(v, dict) for v in args)
    if kind == "choice" and any(isinstance(v, dict) for v in args) and not grouped:
        raise UserError(f"{where}: {label}.choice: either all values are settings mappings or none is")
    if not grouped:
        _check_key(where, label, name)
        _check_searchable(where, label, name)
    if relative and kind in ("choice", "randint"):
        raise UserError(f"{where}: {label}: relative applies to loguniform and uniform ranges, not to {kind}")
    if kind != "choice":
        args = _range(where, f"{label}.{kind}", kind, args)
        if relative:
            own = _get(base.model_dump(), name)
            if not isinstance(own, (int, float)) or isinstance(own, bool) or own <= 0:
                raise UserError(f"{where}: {label}: relative needs a positive number in the run config, not {own!r}")
            args = [a * own for a in args]
    param = Param(name=name, kind=kind, args=args, relative=relative)
    for value in param.values_to_check():
        settings = param.settings(value)
        for key, v in settings.items():
            if grouped:
                _check_key(where, f"{label}.choice", key)
                _check_searchable(where, f"{label}.choice", key)
        _check_values(where, label, base, settings)
    return param


def _range(where: str, label: str, kind: str, args: list) -> list:
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise UserError(f"{where}: {label}: [low, high], two numbers, not {args!r}")
    low, high = args
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"{where}: {label}: low must be below high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: {label}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise UserError(f"{where}: {label}: randint needs integers, got {args!r}")
    return list(args) if kind == "randint" else [float(low), float(high)]


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _check_values(where: str, label: str, base: RunConfig, settings: dict) -> None:
    """`settings` on the base config must make a valid run config (a field's type, range and allowed set)."""
    data = base.model_dump(mode="json")
    for key, value in settings.items():
        _set(data, key, value)
    try:
        RunConfig.model_validate(data)
    except ValidationError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        raise UserError(f"{where}: {label}: {shown} is not allowed: " + format_validation_error(e)) from None
