"""Progress that reads well in a terminal and in a log file.

On a terminal, `progress` is a tqdm bar. When stderr is not a terminal (a log file, `nohup`, a CI job, a Ray
actor) a tqdm bar writes every refresh with a carriage return, which a file keeps as one enormous line; there
`progress` prints an ordinary line every `every_s` seconds (and at the first and last step) instead:
`rl: 20/300 (7%) 2.41 s/it, eta 11m15s, reward=-4.389 kl=0.660`.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterable

LINE_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress:
    """The part of tqdm's interface raycap uses (iteration, `set_postfix`, `close`), printing whole lines."""

    def __init__(self, iterable: Iterable, total: int | None = None, initial: int = 0, desc: str = "",
                 every_s: float | None = None, file=None):
        self.iterable, self.desc = iterable, desc
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.file = file
        self.postfix: dict = {}
        self._t0 = self._last = time.time()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def line(self) -> str:
        done = self.n - self.start
        elapsed = time.time() - self._t0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if done:
            parts.append(f"{elapsed / done:.2f} s/it")
            if self.total:
                parts.append(f"eta {_duration(elapsed / done * (self.total - self.n))}")
        line = ", ".join(parts)
        if self.postfix:
            line += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return line

    def _print(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self._last = time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        """`n` more done (tqdm's `update`): a line at the first, at the last and every `every_s` seconds."""
        first = self.n == self.start
        self.n += n
        if first or self.n == self.total or time.time() - self._last >= self.every_s:
            self._print()

    def close(self) -> None:
        pass


def progress(iterable: Iterable, total: int | None = None, initial: int = 0, desc: str = "", file=None, **tqdm_kwargs):
    """A tqdm bar over `iterable` on a terminal; `LineProgress` lines when the stream (stderr) is not one."""
    stream = file or sys.stderr
    if _isatty(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, file=file, dynamic_ncols=True, **tqdm_kwargs)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, file=file)


def quiet_library_progress() -> None:
    """When stderr is not a terminal, turn off transformers' per-load bars ("Loading weights", "Writing model
    shards"): in a log file each is a carriage-return-joined line with nothing to follow."""
    if not _isatty(sys.stderr):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """While inside: the logger `name` shows records of `level` and above only."""
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)
