"""User-facing errors: one line naming the file, field or value; entry points exit with code 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in the user's input (config value, path, checkpoint). Its message is one line."""


def format_validation_error(err, source: str | None = None) -> str:
    """One line from a pydantic ValidationError: `source: field.path: message (got value)`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<root>"
        msg = e.get("msg", "invalid value")
        if "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(parts)


@contextmanager
def exit_on_user_error():
    """Wrap a CLI main: a UserError prints `error: ...` on stderr and exits 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
