"""The retriever cards of pretrained world dirs side by side, as a markdown table (each card as `raycap pretrain
world` wrote it into DIR/metrics.json, test split), with the goals of the world-v2 issue beside each property.

    python benchmarks/card_table.py runs/card-v1.json runs/world-v2

Each argument is a pretrained world dir or a card file written by `raycap card --world-dir DIR --out FILE`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = (  # (label, goal, how to read it from a card)
    ("P@1 among 100, full descriptions", ">= 0.99", lambda c: f"{c['p_at_1_full']:.3f}"),
    ("P@1 among 100, vague references", "reported", lambda c: f"{c['p_at_1_vague']:.3f}"),
    ("binding accuracy", ">= 0.97", lambda c: f"{c['binding_accuracy']:.3f}"),
    ("full above every true partial lacking one attribute, multi-object scenes", ">= 0.95",
     lambda c: f"{c['specificity_multi_object']:.3f}"),
    ("the same, 1 / 2 / 3 objects", "", lambda c: " / ".join(f"{c[f'specificity_{k}_objects']:.3f}" for k in (1, 2, 3))),
    ("every generic text below the mean of the references", ">= 0.95", lambda c: f"{c['generic_below_references']:.3f}"),
    ("the fixed generic texts alone below the references", "", lambda c: f"{c['fixed_generic_below_references']:.3f}"),
    ('"a shape" above the full description', "", lambda c: f"{c['a_shape_above_full']:.3f}"),
    ('mean cosine: full / one attribute less / references / "a shape"', "",
     lambda c: " / ".join(f"{c['mean_cos'][k]:.3f}" for k in ("full", "dropped_one", "references", "a_shape"))),
    ("probe, exact colour+shape set from the captioner's input, 1 / 2 / 3 objects", "2: >= 0.95, 3: >= 0.85",
     lambda c: " / ".join(f"{c[f'probe_exact_{k}_objects']:.3f}" for k in (1, 2, 3))),
)


def card_of(path: Path) -> dict:
    """A world dir's card (DIR/metrics.json, written by `raycap pretrain world`) or a card file (`raycap card
    --out FILE`)."""
    if path.is_dir():
        return json.loads((path / "metrics.json").read_text())["retriever"]["card"]
    return json.loads(path.read_text())


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("world_dirs", nargs="+", type=Path, help="world dirs or card files")
    args = p.parse_args(argv)
    cards = [card_of(d) for d in args.world_dirs]
    lines = ["| property | goal | " + " | ".join(str(d) for d in args.world_dirs) + " |",
             "|---|---|" + "---|" * len(cards)]
    for label, goal, read in ROWS:
        cells = []
        for card in cards:
            try:
                cells.append(read(card))
            except KeyError:
                cells.append("not measured")
        lines.append(f"| {label} | {goal} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
