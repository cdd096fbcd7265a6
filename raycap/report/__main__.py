"""python -m raycap.report RUN_DIR [--gallery N] [--out DIR]: the HTML report of a training run."""
from __future__ import annotations

import argparse
from pathlib import Path

from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_dir
from raycap.progress import quiet_library_progress
from raycap.commands import prog


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.report"), description=__doc__)
    p.add_argument("run_dir", type=Path, help="a run dir of python -m raycap.train (config.json, metrics.jsonl)")
    p.add_argument("--gallery", type=int, default=24, help="test images shown with their captions (default: 24)")
    p.add_argument("--out", type=Path, help="where index.html and its images go (default: RUN_DIR/report)")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        if args.gallery < 0:
            raise UserError(f"--gallery {args.gallery}: must be >= 0")
        if args.out is not None:
            check_output_dir(args.out, "--out")
        quiet_library_progress()
        from raycap.report.build import build_report

        page = build_report(args.run_dir, out=args.out, gallery=args.gallery)
    print(f"report: {page}  (open it in a browser: file://{page.resolve()})")
    return page


if __name__ == "__main__":
    main()
