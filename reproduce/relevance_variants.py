"""The second method's four captioner variants on the world (the ClipCap self-supervised paper's ablation): an MLP or
a Transformer mapper, over an LM fine-tuned or frozen. Every variant starts its LM from one text-only world LM (as the
paper's from GPT-2), is trained by the supervised stage on the shipped 2% of labels, then runs the self-supervised
CLIP-relevance stage (`world-relevance`); both are scored on the test split by `raycap evaluate`.

    python reproduce/relevance_variants.py --out runs/variants [--seed 0] [--lm-documents 3] [--lm-steps 2000]

Writes OUT/settings.json (the seed, config and LM text; others are refused), OUT/world-lm/ (`raycap pretrain world-lm
--lm-documents N`: N references of a scene per training text; 1 gives an LM that cannot be steered frozen),
OUT/sup-VARIANT/ (`raycap pretrain world --retriever SHIPPED --lm OUT/world-lm [--freeze-lm] --captioner-mapper M`),
OUT/rel-VARIANT/ (`raycap train --config world-relevance`), OUT/{sup,rel}-VARIANT-test.json, then OUT/variants.md (the
table) and OUT/variants.png (BLEU-4 and RefCompare per variant, both arms). Every step is skipped when its output
exists: re-running the command resumes. `--table-only` rebuilds the table and the figure from OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raycap.config import WORLD_DIR
from relevance_label_curve import ARMS, COLUMNS, cells, relevance_and_evaluations
from reproduce_common import check_same_settings, sh, stage_done

# name: (mapper, LM trained)
VARIANTS = {"mlp-tuned": ("mlp", True), "mlp-frozen": ("mlp", False),
            "transformer-tuned": ("transformer", True), "transformer-frozen": ("transformer", False)}
LABELS = {"mlp-tuned": "MLP, LM fine-tuned", "mlp-frozen": "MLP, LM frozen",
          "transformer-tuned": "Transformer, LM fine-tuned", "transformer-frozen": "Transformer, LM frozen"}


def run_variant(out: Path, name: str, seed: int, config: str) -> None:
    mapper, train_lm = VARIANTS[name]
    sup = out / f"sup-{name}"
    if not stage_done(sup / "metrics.json", "captioner"):
        sh("pretrain", "world", "--out", str(sup), "--retriever", str(WORLD_DIR / "retriever"),
           "--lm", str(out / "world-lm"), *([] if train_lm else ["--freeze-lm"]), "--captioner-mapper", mapper,
           "--probe-images", "0", "--seed", str(seed), log=out / f"sup-{name}.log")
    relevance_and_evaluations(out, name, seed, config)


def results(out: Path) -> dict[str, dict[str, dict]]:
    """{variant: {arm: test metrics}} for every variant with both arms evaluated in `out`, in VARIANTS' order."""
    found = {}
    for name in VARIANTS:
        paths = {arm: out / f"{arm}-{name}-test.json" for arm, _ in ARMS}
        if all(p.exists() for p in paths.values()):
            found[name] = {arm: json.loads(p.read_text()) for arm, p in paths.items()}
    return found


def rl_seconds(out: Path, name: str):
    try:
        return json.loads((out / f"rel-{name}" / "final_metrics.json").read_text()).get("rl_seconds")
    except (OSError, ValueError):
        return None


def table(found: dict[str, dict[str, dict]], out: Path) -> str:
    head = "| variant | captioner | " + " | ".join(label for _, label in COLUMNS) + " | RL s |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    for name, arms in found.items():
        for arm, label in ARMS:
            seconds = rl_seconds(out, name) if arm == "rel" else None
            lines.append(f"| {LABELS[name]} | {label} | {cells(arms[arm])} | "
                         f"{'-' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines) + "\n"


def figure(found: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(found)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, [("bleu4", "BLEU-4"), ("refcompare", "RefCompare")]):
        for k, (arm, arm_label) in enumerate(ARMS):
            ax.bar(x + (k - 0.5) * 0.38, [found[n][arm].get(key, float("nan")) for n in names], 0.38, label=arm_label)
        ax.set_xticks(x, [LABELS[n].replace(", ", ",\n") for n in names], fontsize=8)
        ax.set_ylabel(f"{label} (test)")
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("The world at 2% labels: ClipCap's four variants, supervised only vs + CLIP relevance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="world-relevance", help="the self-supervised stage's run config")
    p.add_argument("--lm-documents", type=int, default=3, help="references per text of the world LM's pretraining")
    p.add_argument("--lm-steps", type=int, default=2000, help="the world LM's training steps")
    p.add_argument("--table-only", action="store_true", help="rebuild the table and figure from --out")
    args = p.parse_args(argv)
    if not args.table_only:
        settings = {"seed": args.seed, "config": args.config, "lm_documents": args.lm_documents}
        if args.lm_steps != 2000:
            settings["lm_steps"] = args.lm_steps
        check_same_settings(args.out, settings)
        if not stage_done(args.out / "world-lm" / "metrics.json", "val_loss"):
            sh("pretrain", "world-lm", "--out", str(args.out / "world-lm"), "--seed", str(args.seed),
               "--lm-documents", str(args.lm_documents), "--lm-steps", str(args.lm_steps),
               log=args.out / "world-lm.log")
        for name in args.variants:
            run_variant(args.out, name, args.seed, args.config)
    found = results(args.out)
    if not found:
        sys.exit(f"{args.out}: no variant has both arms evaluated yet")
    (args.out / "variants.md").write_text(table(found, args.out))
    figure(found, args.out / "variants.png")
    print(table(found, args.out), end="")
    print(f"wrote {args.out / 'variants.md'} and {args.out / 'variants.png'}")


if __name__ == "__main__":
    main()
