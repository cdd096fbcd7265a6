"""A LLaVA-style VLM captioner beside ClipCap on the world: a tiny LLaVA whose vision tower is the world retriever's
image tower (an exact copy, frozen), its projector and language model trained by the supervised stage on the shipped
2% of labels, then each method from it: DiscriTune (`world-demo`) and the second method (`world-relevance`, Gumbel
CLIP relevance). One table: P@1, wellformed, faithful (and BLEU-4, RefCompare where a run scores references), RL
seconds, for the LLaVA and for the ClipCap runs of the same configs.

    python reproduce/vlm_world.py --out runs/llava-world [--seed 0] \
        --clipcap-discritune runs/demo-s0 --clipcap-relevance runs/relevance-s0

Writes OUT/settings.json, OUT/llava/ (`examples/make_tiny_llava.py`), OUT/sup/ (`raycap pretrain captioner --config
examples/llava-world.yaml`), OUT/discritune/ (`raycap train --config world-demo --runtime local`), OUT/relevance/
(`raycap train --config world-relevance --runtime local`), each ending with its test table, then OUT/vlm.md. Each step
is skipped when its output exists (re-running resumes); `--table-only` rebuilds the table from OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reproduce_common import check_same_settings, run_example, sh, stage_done

ROOT = Path(__file__).resolve().parents[1]
METHODS = (("discritune", "world-demo"), ("relevance", "world-relevance"))
COLUMNS = (("p_at_1", "P@1"), ("wellformed", "wellformed"), ("faithful", "faithful"), ("bleu4", "BLEU-4"),
           ("refcompare", "RefCompare"))


def run_all(out: Path, seed: int) -> None:
    llava = out / "llava"
    if not (llava / "raycap_source.json").exists():
        run_example("make_tiny_llava.py", "--out", str(llava), "--seed", str(seed), log=out / "llava.log")
    sup = out / "sup"
    if not stage_done(sup / "metrics.json", "train_images"):
        sh("pretrain", "captioner", "--config", str(ROOT / "examples" / "llava-world.yaml"), "--out", str(sup),
           "--set", f"model.vlm={llava}", "--set", f"seed={seed}", log=out / "sup.log")
    for name, config in METHODS:
        rl = out / name
        if not stage_done(rl / "final_metrics.json", "test_table"):
            sh("train", "--config", config, "--runtime", "local", "--out", str(rl),
               "--set", f"captioner.path={sup / 'captioner'}", "--set", f"seed={seed}", "--set", "eval.report=false",
               log=out / f"{name}.log")


def rows_of(run: Path, method: str) -> list[tuple[str, dict, float | None]]:
    """(stage, test-table row, RL seconds) of a run's greedy rows and, for DiscriTune, its selected captions."""
    metrics = json.loads((run / "final_metrics.json").read_text())
    out = []
    for row in metrics["test_table"]["rows"]:
        stage = "supervised" if row["captioner"] == "supervised" else method
        out.append((f"{stage}, {row['decoding']}", row, None if stage == "supervised" else metrics["rl_seconds"]))
    return out


def table(runs: dict[str, dict[str, Path]]) -> str:
    """Markdown: a row per captioner, stage and decoding; the supervised rows once per captioner, with the
    scores every run gave them (the relevance run's test table adds the reference metrics)."""
    lines = ["| captioner | stage, decoding | " + " | ".join(t for _, t in COLUMNS) + " | RL s |",
             "| --- " * (len(COLUMNS) + 3) + "|"]
    for captioner, by_method in runs.items():
        rows: dict[str, tuple[dict, float | None]] = {}
        for method, run in by_method.items():
            for stage, row, seconds in rows_of(run, method):
                if stage in rows:  # the same captioner scored by another run: its other columns
                    row = {**row, **rows[stage][0]}
                rows[stage] = (row, seconds)
        for stage, (row, seconds) in rows.items():
            cells = [f"{row[k]:.3f}" if k in row else "-" for k, _ in COLUMNS]
            rl = "-" if seconds is None else f"{seconds:.0f}"
            lines.append(f"| {captioner} | {stage} | " + " | ".join(cells) + f" | {rl} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clipcap-discritune", type=Path, help="a ClipCap world-demo run dir to compare")
    p.add_argument("--clipcap-relevance", type=Path, help="a ClipCap world-relevance run dir to compare")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from --out")
    args = p.parse_args(argv)
    if not args.table_only:
        check_same_settings(args.out, {"seed": args.seed})
        run_all(args.out, args.seed)
    runs = {"LLaVA (world retriever's tower)": {m: args.out / m for m, _ in METHODS}}
    clipcap = {m: r for m, r in (("discritune", args.clipcap_discritune), ("relevance", args.clipcap_relevance)) if r}
    if clipcap:
        runs["ClipCap"] = clipcap
    for by_method in runs.values():
        for run in by_method.values():
            if not stage_done(run / "final_metrics.json", "test_table"):
                sys.exit(f"{run}: the RL run has not finished")
    text = table(runs)
    (args.out / "vlm.md").write_text(text)
    print(text, end="")
    print(f"wrote {args.out / 'vlm.md'}")


if __name__ == "__main__":
    main()
