"""A markdown table of `raycap evaluate --json` results, one row per file (named by its file name without
`.json`): the metrics the second method's claims are judged by.

    python reproduce/eval_table.py runs/rel/sup-val.json runs/rel/g-kl05-val.json ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("p_at_1", "bleu4", "cider", "refcompare", "clipscore", "wellformed", "faithful", "recall", "mean_length")


def table(paths: list[Path], columns=COLUMNS) -> str:
    lines = ["| result | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for path in paths:
        m = json.loads(path.read_text())
        cells = ("-" if not isinstance(m.get(k), (int, float)) else f"{m[k]:.3f}" for k in columns)
        lines.append(f"| {path.name.removesuffix('.json')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    print(table(p.parse_args(argv).results), end="")


if __name__ == "__main__":
    main()
