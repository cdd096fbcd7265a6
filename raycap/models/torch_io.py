"""Reading `.pt` / `.bin` / `.pth` files the user gives (a ClipCap checkpoint, an open_clip checkpoint or model
directory, a run's trainer state) as plain tensors only: `torch.load(weights_only=True)`, with a file that needs
more (pickled code: possibly malicious) or cannot be read refused in one line naming it, instead of torch's
traceback that advises re-running with weights_only=False."""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

from raycap.errors import UserError

CONVERT_HINT = ("if you trust it, load it yourself in Python (torch.load(path, weights_only=False)) and save its "
                "state_dict with torch.save(model.state_dict(), path)")


def not_plain_tensors(what: str | Path) -> UserError:
    return UserError(f"{what}: not a plain tensor checkpoint (it holds pickled objects), and raycap will not "
                     f"unpickle it; {CONVERT_HINT}")


@contextmanager
def refusing_pickles(what: str | Path):
    """Turn torch's refusal of a pickled object inside (`weights_only=True`: `pickle.UnpicklingError`, also when
    a library such as open_clip calls torch.load) into a one-line UserError naming `what` (the file, or the
    directory it was read from)."""
    try:
        yield
    except pickle.UnpicklingError:
        raise not_plain_tensors(what) from None


def load_tensors(path: str | Path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`: tensors, dicts, lists and numbers only. A pickled object is refused
    (`not_plain_tensors`), a truncated or non-torch file is a one-line UserError naming it."""
    import torch

    with refusing_pickles(path):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        except (RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: cannot read it as a torch checkpoint (truncated or not a torch file: "
                            f"{first})") from None
