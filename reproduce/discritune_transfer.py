"""DiscriTune's transfer claim on the world (Dessì et al. 2023: discriminatively fine-tuned captions resemble human
references more out of domain, slightly less in domain): the supervised captioner and DiscriTune-fine-tuned ones,
trained on the standard world, scored zero-shot on shifted worlds that keep the vocabulary.

    python reproduce/discritune_transfer.py --out runs/transfer --runs runs/demo-s0 runs/demo-s1 runs/demo-s2

Writes OUT/settings.json (the captioners, decoding and world; others are refused), OUT/worlds/NAME/ (the shifted
world's world.json beside a copy of the world's retriever: the same frozen retriever judges every world),
OUT/NAME/{supervised,RUN}.json (`raycap evaluate --world-dir OUT/worlds/NAME --dataset world:test`), then
OUT/transfer.md (the table) and OUT/transfer.png (the figure). Every evaluation is skipped when its output exists:
re-running the command resumes. `--table-only` rebuilds the table and the figure from OUT.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from raycap.config import WORLD_DIR
from reproduce_common import check_same_settings, sh

SHIFTS = {  # name -> (what differs, world.json overrides); every word of every shifted world is in the vocabulary
    "in-domain": ("the standard world", {}),
    "more-objects": ("2-4 objects instead of 1-3", {"min_objects": 2, "max_objects": 4}),
    "smaller-shapes": ("objects drawn at 0.75 of their size", {"shape_scale": 0.75}),
    "off-centre": ("positions jittered by up to 5 px instead of 2", {"jitter": 5}),
    "noisier": ("pixel noise 32 instead of 6", {"noise": 32.0}),
    "novel-colours": ("pink and brown, never seen in training, replace yellow and white",
                      {"colours": ["red", "green", "blue", "pink", "orange", "purple", "brown", "cyan"]}),
    "detailed-refs": ("another reference style: two objects in half the references, few details dropped, "
                      "no generic ones", {"generic_ref_share": 0.0, "two_object_ref_share": 0.5,
                                          "ref_drop": {"size": 0.2, "colour": 0.1, "shape": 0.0,
                                                       "position": 0.3}}),
}
SUPERVISED = "supervised"
COLUMNS = [("p_at_1", "P@1"), ("cider", "CIDEr"), ("bleu4", "BLEU-4"), ("faithful", "faithful"),
           ("cider_full", "CIDEr vs full")]


def make_world(out: Path, name: str, base: Path) -> Path:
    """OUT/worlds/NAME: the base world's world.json with the shift's overrides, and its retriever."""
    from raycap.data.world import WorldConfig

    world = out / "worlds" / name
    config = json.loads((base / "world.json").read_text()) | SHIFTS[name][1]
    if (world / "world.json").exists():
        if json.loads((world / "world.json").read_text()) != config:  # the shift was redefined since
            sys.exit(f"{world / 'world.json'}: not the {name} shift of today's script; delete {world} and "
                     f"{out / name} to evaluate it again")
    else:
        WorldConfig.parse(config, f"shift {name}")  # a bad override stops here, named
        if not (world / "retriever").exists():  # copied whole, then renamed: a cut copy is never taken as done
            shutil.rmtree(world / "retriever.partial", ignore_errors=True)
            shutil.copytree(base / "retriever", world / "retriever.partial")
            (world / "retriever.partial").rename(world / "retriever")
        (world / "world.json").write_text(json.dumps(config, indent=2))  # last: its existence marks a whole world
    return world


def captioners(supervised: Path, runs: list[Path]) -> dict[str, Path]:
    """{label: captioner dir}: the supervised captioner, then each run's final captioner by the run's name."""
    found = {SUPERVISED: supervised}
    for run in runs:
        found[run.name] = run / "final"
    return found


def evaluate_all(out: Path, base: Path, models: dict[str, Path], decoding: str, shifts: list[str]) -> None:
    for name in shifts:
        world = make_world(out, name, base)
        (out / name).mkdir(exist_ok=True)
        for label, captioner in models.items():
            result = out / name / f"{label}.json"
            if not result.exists():
                sh("evaluate", "--captioner", str(captioner), "--world-dir", str(world), "--dataset", "world:test",
                   "--decoding", decoding, "--json", str(result), log=out / name / f"{label}.log")


def results(out: Path) -> dict[str, dict[str, dict]]:
    """{world: {label: test metrics}} for every world of SHIFTS evaluated in `out` with the supervised captioner and
    at least one fine-tuned one."""
    found = {}
    for name in SHIFTS:
        files = {p.stem: json.loads(p.read_text()) for p in sorted((out / name).glob("*.json"))}
        if SUPERVISED in files and len(files) > 1:
            found[name] = files
    return found


def spread(values: list[float]) -> str:
    """mean (min-max) over the fine-tuned runs; the value alone for one run."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(found: dict[str, dict[str, dict]]) -> str:
    lines = ["| world | what differs | metric | supervised | fine-tuned | change |", "|" + " --- |" * 6]
    for name, arms in found.items():
        tuned = [m for label, m in arms.items() if label != SUPERVISED]
        for i, (key, label) in enumerate(COLUMNS):
            sup = arms[SUPERVISED].get(key)
            values = [m[key] for m in tuned if isinstance(m.get(key), (int, float))]
            if not isinstance(sup, (int, float)) or not values:
                continue
            first = f"{name} | {SHIFTS[name][0]}" if i == 0 else " | "
            lines.append(f"| {first} | {label} | {sup:.3f} | {spread(values)} | {np.mean(values) - sup:+.3f} |")
    return "\n".join(lines) + "\n"


def figure(found: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(found)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, label) in zip(axes, [("cider", "CIDEr vs the references"), ("p_at_1", "P@1 among 100")]):
        sup = [found[n][SUPERVISED].get(key, np.nan) for n in names]
        tuned = [[m.get(key, np.nan) for lab, m in found[n].items() if lab != SUPERVISED] for n in names]
        mean = [np.mean(t) for t in tuned]
        err = np.array([[m - min(t) for m, t in zip(mean, tuned)], [max(t) - m for m, t in zip(mean, tuned)]])
        ax.bar(x - 0.2, sup, 0.4, label="supervised")
        ax.bar(x + 0.2, mean, 0.4, yerr=err, capsize=3, label="DiscriTune (mean, min-max)")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel(f"{label} (test)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Trained on the standard world, scored zero-shot on shifted worlds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, nargs="+", default=[],
                   help="DiscriTune run dirs trained on the standard world (their final/ captioner)")
    p.add_argument("--supervised", type=Path, default=WORLD_DIR / "captioner",
                   help="the supervised captioner they started from (default: the shipped one)")
    p.add_argument("--world-dir", type=Path, default=WORLD_DIR, help="the standard world (default: the shipped one)")
    p.add_argument("--decoding", choices=("greedy", "beam"), default="greedy")
    p.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    p.add_argument("--table-only", action="store_true", help="rebuild the table and figure from --out")
    args = p.parse_args(argv)
    if not args.table_only:
        if not args.runs:
            sys.exit("--runs: give at least one DiscriTune run dir")
        models = captioners(args.supervised, args.runs)
        missing = [str(d) for d in models.values() if not d.is_dir()]
        if missing:
            sys.exit(f"{missing[0]}: no captioner there (--runs takes run dirs with a final/ captioner)")
        unfinished = [str(r) for r in args.runs if not (r / "final_metrics.json").is_file()]
        if unfinished:
            sys.exit(f"--runs: {unfinished[0]} has not finished (no final_metrics.json)")
        if len(set(models)) != len(args.runs) + 1 or SUPERVISED in [r.name for r in args.runs]:
            sys.exit("--runs: each run dir needs its own name, other than 'supervised'")
        check_same_settings(args.out, {"supervised": str(args.supervised.resolve()),
                                       "runs": [str(r.resolve()) for r in args.runs],
                                       "world": str(args.world_dir.resolve()), "decoding": args.decoding})
        evaluate_all(args.out, args.world_dir, models, args.decoding, args.shifts)
    found = results(args.out)
    if not found:
        sys.exit(f"{args.out}: no world has the supervised and a fine-tuned captioner evaluated yet")
    (args.out / "transfer.md").write_text(table(found))
    figure(found, args.out / "transfer.png")
    print(table(found), end="")
    print(f"wrote {args.out / 'transfer.md'} and {args.out / 'transfer.png'}")


if __name__ == "__main__":
    main()
