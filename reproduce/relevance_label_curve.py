"""The second method's label curve on the world (the ClipCap self-supervised paper's Figure 4): for each labelled-set
size, the supervised captioner trained on that many labelled images, then the self-supervised CLIP-relevance stage
(`world-relevance`) from it; both scored on the test split by `raycap evaluate`.

    python reproduce/relevance_label_curve.py --out runs/label-curve [--sizes 100 400 800 4000 40000] [--seed 0]

Writes OUT/settings.json (the seed and config; another pair is refused), OUT/sup-N/ (`raycap pretrain world
--retriever SHIPPED`: the shipped retriever, a captioner on the first N training images' references), OUT/rel-N/ (`raycap train --config world-relevance`), OUT/{sup,rel}-N-test.json,
then OUT/label_curve.md (the table) and OUT/label_curve.png (BLEU-4 and RefCompare against N, both arms). Every
step is skipped when its output exists: re-running the command resumes. `--table-only` rebuilds the table and the
figure from OUT.

Each supervised captioner gets the shipped recipe's number of updates (20 epochs of 800 images' references), in
more epochs for fewer images, and at least one epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raycap.config import WORLD_DIR
from reproduce_common import check_same_settings, sh, stage_done

SIZES = (100, 400, 800, 4000, 40000)
SHIPPED_LABELS, SHIPPED_EPOCHS = 800, 20  # the shipped captioner: 2% of 40,000 images, 20 epochs
COLUMNS = [("bleu4", "BLEU-4"), ("cider", "CIDEr"), ("refcompare", "RefCompare"), ("clipscore", "CLIPScore"),
           ("p_at_1", "P@1"), ("wellformed", "wellformed"), ("faithful", "faithful"), ("recall", "recall")]
ARMS = (("sup", "supervised"), ("rel", "+ CLIP relevance"))


def epochs_for(n: int) -> int:
    """The shipped recipe's updates for n labelled images: 20 epochs at 800, scaled inversely, at least one."""
    return max(1, round(SHIPPED_EPOCHS * SHIPPED_LABELS / n))


def run_size(out: Path, n: int, seed: int, config: str, n_train: int, supervised_only: bool = False) -> None:
    sup, rel = out / f"sup-{n}", out / f"rel-{n}"
    if not stage_done(sup / "metrics.json", "captioner"):
        sh("pretrain", "world", "--out", str(sup), "--retriever", str(WORLD_DIR / "retriever"),
           "--set", f"labelled_fraction={n / n_train}", "--captioner-epochs", str(epochs_for(n)),
           "--probe-images", "0", "--seed", str(seed), log=out / f"sup-{n}.log")
    if supervised_only:
        return
    relevance_and_evaluations(out, str(n), seed, config)


def relevance_and_evaluations(out: Path, tag: str, seed: int, config: str) -> None:
    """From OUT/sup-TAG/captioner: the self-supervised stage into OUT/rel-TAG, then both captioners scored on the
    test split into OUT/{sup,rel}-TAG-test.json; each step skipped when its output exists."""
    sup, rel = out / f"sup-{tag}", out / f"rel-{tag}"
    if not stage_done(rel / "final_metrics.json", "p_at_1"):
        sh("train", "--config", config, "--runtime", "local", "--out", str(rel),
           "--set", f"captioner.path={sup / 'captioner'}", "--set", f"seed={seed}",
           "--set", "eval.test_table=false", "--set", "eval.report=false", log=out / f"rel-{tag}.log")
    for arm, captioner in (("sup", sup / "captioner"), ("rel", rel / "final")):
        result = out / f"{arm}-{tag}-test.json"
        if not result.exists():
            sh("evaluate", "--captioner", str(captioner), "--dataset", "world:test", "--json", str(result),
               log=out / f"{arm}-{tag}-test.log")


def cells(metrics: dict) -> str:
    """A table row's COLUMNS cells: each metric to 3 decimals, '-' where it is missing."""
    return " | ".join("-" if not isinstance(metrics.get(k), (int, float)) else f"{metrics[k]:.3f}" for k, _ in COLUMNS)


def results(out: Path) -> dict[int, dict[str, dict]]:
    """{N: {arm: test metrics}} for every size with both arms evaluated in `out`."""
    found = {}
    for path in sorted(out.glob("sup-*-test.json")):
        n = int(path.name.split("-")[1])
        rel = out / f"rel-{n}-test.json"
        if rel.exists():
            found[n] = {"sup": json.loads(path.read_text()), "rel": json.loads(rel.read_text())}
    return dict(sorted(found.items()))


def table(found: dict[int, dict[str, dict]]) -> str:
    head = "| labelled images | captioner | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for n, arms in found.items():
        for arm, label in ARMS:
            lines.append(f"| {n:,} | {label} | {cells(arms[arm])} |")
    return "\n".join(lines) + "\n"


def figure(found: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(found)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label) in zip(axes, [("bleu4", "BLEU-4"), ("refcompare", "RefCompare")]):
        for arm, name in ARMS:
            ax.plot(sizes, [found[n][arm].get(key, float("nan")) for n in sizes], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(f"{label} (test)")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].legend()
    fig.suptitle("The world: supervised only vs + CLIP relevance, by labelled-set size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="world-relevance", help="the self-supervised stage's run config")
    p.add_argument("--table-only", action="store_true", help="rebuild the table and figure from --out")
    p.add_argument("--supervised-only", action="store_true", help="train the supervised captioners only")
    args = p.parse_args(argv)
    if not args.table_only:
        n_train = json.loads((WORLD_DIR / "world.json").read_text())["n_train"]
        bad = [n for n in args.sizes if not 1 <= n <= n_train]
        if bad:
            sys.exit(f"--sizes: {bad[0]} is not between 1 and the world's {n_train} training images")
        check_same_settings(args.out, {"seed": args.seed, "config": args.config})
        for n in args.sizes:
            run_size(args.out, n, args.seed, args.config, n_train, args.supervised_only)
        if args.supervised_only:
            return
    found = results(args.out)
    if not found:
        sys.exit(f"{args.out}: no size has both arms evaluated yet")
    (args.out / "label_curve.md").write_text(table(found))
    figure(found, args.out / "label_curve.png")
    print(table(found), end="")
    print(f"wrote {args.out / 'label_curve.md'} and {args.out / 'label_curve.png'}")


if __name__ == "__main__":
    main()
