"""Reading raycap's safetensors weights with a one-line `UserError` naming the file when it is truncated or
corrupt (what an interrupted copy or a full disk leaves), instead of a `SafetensorError` traceback."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from raycap.errors import UserError


def unreadable(path: str | Path, err: BaseException) -> UserError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(f"{path}: cannot read weights (truncated or corrupt safetensors file: {msg})")


@contextmanager
def reading_weights(path: str | Path):
    """Turn a SafetensorError raised inside (e.g. by `from_pretrained` of a dir) into a UserError naming `path`."""
    try:
        yield
    except SafetensorError as e:
        raise unreadable(path, e) from None


def load_weights(path: str | Path) -> dict:
    """`safetensors.torch.load_file`, with a one-line UserError naming `path` if it cannot be read."""
    with reading_weights(path):
        return load_file(str(path))
