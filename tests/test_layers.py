"""The package's layers (DESIGN.md), checked over every module of raycap/.

Each module has a layer (`LAYERS`: a module or package prefix -> layer; the longest prefix that matches wins, so a
new module is placed by its package or must be added). No import, at module level or inside a function (and
`from . import x` or `importlib.import_module("raycap.x")` alike), goes to a higher layer; the two runners of a
run (the Ray runtime and the single-process reference loop) do not import each other; rl/ is pure tensor code,
without Ray; and the import graph among raycap's modules has no cycle. The parts that come in kinds (captioners,
rewards, baselines) sit behind registries whose names the config's choices must match.
"""
from __future__ import annotations

import ast
import sys
import typing
from pathlib import Path

import raycap

ROOT = Path(raycap.__file__).parent

BASE, GROUND, PLUMBING, SUPERVISED, RL, ROLES, RUNNERS, ENTRY = range(8)

LAYERS = {
    # base: small utilities every layer may use
    "raycap.errors": BASE,
    "raycap.paths": BASE,
    "raycap.progress": BASE,
    "raycap.commands": BASE,  # the command table: names only, imports no command
    # the ground: the run config (settings only), data sources, models (torch, HF, open_clip)
    "raycap.config": GROUND,
    "raycap.data": GROUND,
    "raycap.models": GROUND,
    # on the ground: caption metrics, a run's inputs opened, starting Ray, run records, search spaces
    "raycap.metrics": PLUMBING,
    "raycap.inputs": PLUMBING,
    "raycap.memory": PLUMBING,
    "raycap.ray_start": PLUMBING,
    "raycap.runlog": PLUMBING,
    "raycap.tracking": PLUMBING,
    "raycap.search": PLUMBING,
    # the supervised stage and the evaluation of a captioner (decoding, scoring)
    "raycap.supervised": SUPERVISED,
    # the algorithm: pure tensor code, called by both runners, knowing neither
    "raycap.rl": RL,
    # what both runners build from rl/: each role's models; a run's report (reads a run dir, evaluates on test)
    "raycap.roles": ROLES,
    "raycap.report": ROLES,
    # the two runners of a run: the Ray runtime (all Ray actors, Tune) and the single-process reference loop
    "raycap.runtime": RUNNERS,
    "raycap.local_trainer": RUNNERS,
    # entry points (python -m raycap.X, the console script, the Python API)
    "raycap": ENTRY,  # the package itself (its lazy API attributes); matches no other module
    "raycap.__main__": ENTRY,
    "raycap.cli": ENTRY,
    "raycap.api": ENTRY,
    "raycap.train": ENTRY,
    "raycap.tune": ENTRY,
    "raycap.evaluate": ENTRY,
    "raycap.caption": ENTRY,
    "raycap.pretrain": ENTRY,
    "raycap.convert": ENTRY,
    "raycap.card": ENTRY,
    "raycap.data.__main__": ENTRY,
    "raycap.report.__main__": ENTRY,
}

SIBLINGS = [("raycap.runtime", "raycap.local_trainer")]  # same layer, and neither imports the other
NO_THIRD_PARTY = {"raycap.rl": ("ray",)}  # rl/ is called by the reference loop too: no Ray in it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int | None:
    """The layer of the longest `LAYERS` prefix of `module` (the root package matches only itself)."""
    best = None
    for prefix, n in LAYERS.items():
        if module == prefix or (prefix != "raycap" and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, n)
    return None if best is None else best[1]


def _import_module_literal(node: ast.AST) -> str | None:
    """"raycap.x" of `importlib.import_module("raycap.x")` (or `import_module(...)`, `__import__(...)`)."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    arg = node.args[0]
    if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import of `module`, wherever it stands in the file. `from P import x`
    counts as an import of P.x when that is a module, else of P; relative imports are resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
        elif (name := _import_module_literal(node)) is not None:
            found.append((name, node.lineno))
    return found


def raycap_imports(module: str) -> list[tuple[str, int]]:
    """The imports of raycap modules (the nearest existing module for `import raycap.a.b` of a name)."""
    out = []
    for name, line in imports(module):
        if name != "raycap" and not name.startswith("raycap."):
            continue
        while name not in MODULES and "." in name:
            name = name.rpartition(".")[0]
        if name != module:
            out.append((name, line))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {name for name, _ in raycap_imports(m)} for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in import order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer(m) is None] == [], "place each new module in LAYERS"


def test_the_table_names_no_missing_module():
    # a prefix that matches nothing is a stale entry (a module moved or renamed)
    stale = [p for p in LAYERS if not any(m == p or m.startswith(p + ".") for m in MODULES)]
    assert stale == []


def test_no_import_goes_up():
    up = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {name} (layer {layer(m)} -> {layer(name)})"
          for m in MODULES for name, line in raycap_imports(m)
          if layer(name) is not None and layer(m) is not None and layer(name) > layer(m)]
    assert up == []


def test_siblings_do_not_import_each_other():
    def under(m, prefix):
        return m == prefix or m.startswith(prefix + ".")

    crossed = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {name}"
               for a, b in SIBLINGS for x, y in ((a, b), (b, a))
               for m in MODULES if under(m, x) for name, line in raycap_imports(m) if under(name, y)]
    assert crossed == []


def test_rl_is_pure_tensor_code():
    found = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {name}"
             for prefix, banned in NO_THIRD_PARTY.items()
             for m in MODULES if m == prefix or m.startswith(prefix + ".")
             for name, line in imports(m) if any(name == b or name.startswith(b + ".") for b in banned)]
    assert found == []


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_what_they_check():
    """The walk sees function-level and relative imports and `import_module` literals; the cycle finder finds a
    cycle; the layer lookup takes the longest prefix."""
    assert ("raycap.models.devices", ) == tuple(n for n, _ in raycap_imports("raycap.runtime.resources")
                                                if n == "raycap.models.devices")  # inside role_device
    assert layer("raycap.report.__main__") == ENTRY and layer("raycap.report.build") == ROLES
    assert layer("raycap.data.__main__") == ENTRY and layer("raycap.data.world") == GROUND
    assert layer("raycap.somewhere_new") is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("import importlib\nimportlib.import_module('raycap.x')\n")
    assert [_import_module_literal(n) for n in ast.walk(tree) if _import_module_literal(n)] == ["raycap.x"]


def test_relative_imports_resolve(tmp_path, monkeypatch):
    pkg = tmp_path / "raycap" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "raycap" / "__init__.py").write_text("")
    (tmp_path / "raycap" / "top.py").write_text("")
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from ..top import thing\n    from .b import x\n")
    (pkg / "b.py").write_text("")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "ROOT", tmp_path / "raycap")
    monkeypatch.setattr(here, "MODULES", {module_name(p): p for p in (tmp_path / "raycap").rglob("*.py")})
    assert sorted(n for n, _ in raycap_imports("raycap.sub.a")) == ["raycap.sub.b", "raycap.top"]
    assert [n for n, _ in raycap_imports("raycap.sub")] == ["raycap.sub.a"]


# parts behind registries: the config's choices are the registries' names


def _choices(model, field: str) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


def test_reward_and_baseline_choices_are_the_registries():
    from raycap.config import AlgorithmConfig, RewardConfig
    from raycap.rl import baselines, rewards

    assert _choices(RewardConfig, "kind") == tuple(rewards.REWARDS)
    assert _choices(AlgorithmConfig, "baseline") == tuple(baselines.BASELINES)


def test_captioner_kinds_are_the_registry():
    from raycap.models.loading import CAPTIONERS
    from raycap.supervised.captioner_stage import CaptionerModelConfig

    assert _choices(CaptionerModelConfig, "kind") == tuple(CAPTIONERS)
