"""Checking output paths before any heavy work starts: a bad `--out` or `--json` is a one-line `UserError`
naming the flag and the path, raised before models load, instead of a traceback after a finished run."""
from __future__ import annotations

import tempfile
from pathlib import Path

from raycap.errors import UserError


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _check_creatable(path: Path, flag: str) -> None:
    """Whether `path` (absent) can be made: its nearest existing ancestor is a directory we can write in
    (probed with a temporary file, so it holds for root and read-only file systems too)."""
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: cannot be created, {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: not writable (cannot create a file in {base}: {e.strerror or e})") from None


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """A run/output directory: absent (creatable), or an existing writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    _check_creatable(path, flag)


def check_output_file(path: str | Path, flag: str) -> None:
    """A file to write at the end: not a directory, and writable (an existing file is not modified here)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path such as {path / 'metrics.json'}")
    if path.exists():
        try:
            with path.open("a"):  # append mode: nothing written, nothing truncated
                pass
        except OSError as e:
            raise UserError(f"{flag} {path}: not writable ({e.strerror or e})") from None
    else:
        _check_creatable(path, flag)
