"""raycap's commands: one table of subcommand -> entry-point module, and the name a command's help shows
(`raycap train` through the console script, `python -m raycap.train` when run as a module)."""
from __future__ import annotations

COMMANDS = {  # subcommand: (module whose main(argv) runs it, one line of help)
    "train": ("raycap.train", "one RL run (Ray runtime, or --runtime local)"),
    "tune": ("raycap.tune", "a Ray Tune search over a YAML space"),
    "evaluate": ("raycap.evaluate", "metrics of a captioner, or of given captions, on a dataset"),
    "caption": ("raycap.caption", "caption image files with a captioner"),
    "report": ("raycap.report", "the HTML report of a run"),
    "pretrain": ("raycap.pretrain", "the supervised stage (world retriever and captioner, or a captioner)"),
    "convert": ("raycap.convert", "a published ClipCap or BLIP as a raycap captioner dir"),
    "data": ("raycap.data", "data tools (export-world)"),
    "card": ("raycap.card", "a retriever's card: retrieval, binding, specificity, generic gap, what captioners read"),
}

_console = {"on": False}  # set by raycap.cli once per process


def use_console_names() -> None:
    """From now on, help and messages name commands as the console script does (`raycap train`)."""
    _console["on"] = True


def prog(module: str) -> str:
    """The command line that runs `module`'s entry point, as the user typed it."""
    if _console["on"]:
        for name, (mod, _) in COMMANDS.items():
            if mod == module:
                return f"raycap {name}"
    return f"python -m {module}"


def make_callable(module: str, target: str) -> None:
    """Let the module `module` be called as the function `target` ("package.module:function"), so that
    `raycap.train(...)` and `raycap.evaluate(...)` are the Python API while `python -m raycap.train` and
    `from raycap.train import main` keep working."""
    import importlib
    import sys
    import types

    where, _, name = target.partition(":")

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(where), name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = f"{target}: see its help()"
    sys.modules[module].__class__ = CallableModule
