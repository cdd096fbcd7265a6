"""The package's layers (DESIGN.md): data/ and models/ are the ground and import nothing above them; rl/ is pure
tensor code (no Ray, no runtime); only runtime/ (and the entry points that start it) use Ray."""
import ast
from pathlib import Path

import raycap

ROOT = Path(raycap.__file__).parent
ABOVE_GROUND = ("raycap.rl", "raycap.runtime", "raycap.supervised", "raycap.report", "raycap.train",
                "raycap.local_trainer", "raycap.evaluate", "raycap.caption", "raycap.pretrain", "raycap.tune")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).rglob("*.py"))
            for name in sorted(imports(path)) if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_data_and_models_import_nothing_above_them():
    assert offenders("data", ABOVE_GROUND) == []
    assert offenders("models", ABOVE_GROUND) == []


def test_rl_is_pure_tensor_code():
    assert offenders("rl", ("ray", "raycap.runtime", "raycap.local_trainer", "raycap.train")) == []
