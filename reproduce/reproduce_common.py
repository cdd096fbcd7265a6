"""What the reproduction scripts share: running a raycap command into a log, telling a finished stage from a cut
one, and refusing an --out made with other settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def sh(*args: str, log: Path) -> None:
    """Run a raycap command (this interpreter), its output into `log`; a failure stops the script, naming the log."""
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "raycap", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(args[:2])} failed (exit {rc}); see {log}")


def run_example(script: str, *args: str, log: Path) -> None:
    """Run examples/SCRIPT with `args` (this interpreter), its output into `log`; a failure stops the script, naming
    the log."""
    root = Path(__file__).resolve().parents[1]
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, str(root / "examples" / script), *args], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{Path(script).stem} failed (exit {rc}); see {log}")


def stage_done(path: Path, key: str) -> bool:
    """A stage wrote its metrics file last, with `key` in it: its model is complete (a killed save is redone)."""
    try:
        return key in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def check_same_settings(out: Path, settings: dict) -> None:
    """OUT/settings.json records the settings the outputs were made with: others are refused (their steps would be
    skipped as done)."""
    saved = out / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        sys.exit(f"{saved}: {out} was made with {json.loads(saved.read_text())}, not {settings}; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings))
