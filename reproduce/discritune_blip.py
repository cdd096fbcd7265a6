"""DiscriTune on a BLIP captioner (the paper's replication with BLIP), on the world: a tiny BLIP whose vision tower is
the world retriever's image tower (copied, then distilled on unlabelled training images, frozen after), its text
decoder trained by the supervised stage on the shipped 2% of labels, then the demo's RL (`world-demo`).

    python reproduce/discritune_blip.py --out runs/blip-v2 [--seed 0] [--demo-runs runs/demo-s0 ...]

Writes OUT/settings.json, OUT/blip/ (`examples/make_tiny_blip.py --vision-from SHIPPED_RETRIEVER`), OUT/sup/
(`raycap pretrain captioner --config examples/blip-world-v2.yaml`), OUT/rl/ (`raycap train --config world-demo
--runtime local`, ending with its test table: each captioner greedy and with test-time selection), then OUT/blip.md:
that test table beside the ClipCap demo runs' (`benchmarks/run_table.py --test-table`). Each step is skipped when its
output exists (re-running resumes); `--table-only` rebuilds the table from OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from raycap.config import WORLD_DIR
from reproduce_common import check_same_settings, run_example, sh, stage_done

ROOT = Path(__file__).resolve().parents[1]


def run_all(out: Path, seed: int) -> None:
    blip = out / "blip"
    if not (blip / "vision_distillation.json").exists():
        run_example("make_tiny_blip.py", "--out", str(blip), "--vision-from", str(WORLD_DIR / "retriever"), "--seed",
                    str(seed), log=out / "blip.log")
    sup = out / "sup"
    if not stage_done(sup / "metrics.json", "train_images"):
        sh("pretrain", "captioner", "--config", str(ROOT / "examples" / "blip-world-v2.yaml"), "--out", str(sup),
           "--set", f"model.blip={blip}", "--set", f"seed={seed}", log=out / "sup.log")
    rl = out / "rl"
    if not stage_done(rl / "final_metrics.json", "test_table"):
        sh("train", "--config", "world-demo", "--runtime", "local", "--out", str(rl),
           "--set", f"captioner.path={sup / 'captioner'}", "--set", f"seed={seed}", "--set", "eval.report=false",
           log=out / "rl.log")


def tables(out: Path, demo_runs: list[Path]) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_table import test_table

    text = ""
    for title, runs in (("BLIP, vision tower from the world retriever", [out / "rl"]),
                        ("ClipCap (the demo)", demo_runs)):
        if not runs:
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            test_table(runs)
        text += f"### {title} ({len(runs)} run{'s' if len(runs) > 1 else ''})\n\n{buf.getvalue()}\n"
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo-runs", type=Path, nargs="*", default=[], help="ClipCap world-demo run dirs to compare")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from --out")
    args = p.parse_args(argv)
    if not args.table_only:
        check_same_settings(args.out, {"seed": args.seed})
        run_all(args.out, args.seed)
    if not stage_done(args.out / "rl" / "final_metrics.json", "test_table"):
        sys.exit(f"{args.out / 'rl'}: the RL run has not finished")
    text = tables(args.out, args.demo_runs)
    (args.out / "blip.md").write_text(text)
    print(text, end="")
    print(f"wrote {args.out / 'blip.md'}")


if __name__ == "__main__":
    main()
