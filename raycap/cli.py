"""The `raycap` console command: `raycap COMMAND [ARGS]`, each command the `python -m raycap.COMMAND` entry point
of the same name with the same arguments (`raycap COMMAND --help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from raycap.commands import COMMANDS, use_console_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)  # its own parser reads the rest, --help included
    return p


def main(argv=None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints help, or the usage error naming the unknown command (exit 2)
        return None
    use_console_names()
    name = COMMANDS[argv[0]][0]
    module = importlib.import_module(name)
    if not hasattr(module, "main"):  # a package: its entry point is its __main__ module
        module = importlib.import_module(f"{name}.__main__")
    module.main(argv[1:])  # what it returns is for Python callers; the console script exits 0
    return 0


if __name__ == "__main__":
    main()
