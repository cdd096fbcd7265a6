"""Data tools: `python -m raycap.data export-world --out DIR` writes the shapes world as real files."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from raycap.errors import exit_on_user_error
from raycap.commands import prog


def build_parser() -> argparse.ArgumentParser:
    from raycap.data import export

    p = argparse.ArgumentParser(prog=prog("raycap.data"), description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("export-world", help="write the world's images, Karpathy JSON and retriever as files",
                       description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    e.add_argument("--world-dir", type=Path, default=export.SHIPPED_WORLD,
                   help="pretrained world directory (python -m raycap.pretrain world); default: the shipped world")
    e.add_argument("--splits", default=",".join(export.EXPORT_SPLITS),
                   help="comma-separated splits to export (default: train,val,test)")
    e.add_argument("--max-train", type=int, default=None, metavar="N", help="export only the first N train images")
    e.add_argument("--workers", type=int, default=None, metavar="K",
                   help="processes writing images (default: the number of CPUs)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        from raycap.data import export

        if args.command == "export-world":
            splits = export.parse_splits(args.splits)
            summary = export.export_world(args.out, args.world_dir, splits, args.max_train, args.workers,
                                          command=export.command_line(argv))
            print(json.dumps(summary), file=sys.stdout)
            return summary
    raise AssertionError(args.command)  # argparse only lets known commands through


if __name__ == "__main__":
    main()
