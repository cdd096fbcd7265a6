"""The validation select rows of run dirs, one per `RUN/val_select*.json` (written by `raycap evaluate --decoding
select --select-config CFG --json RUN/val_select_NAME.json`), as a markdown table; the error cut is against the
run's own step-0 (supervised captioner) validation P@1.

    python benchmarks/select_weights.py [LABEL=]RUN ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN")
    args = p.parse_args(argv)
    print("| validation | select settings (file) | P@1 | P@1 error cut | wellformed | faithful | 1 obj | 2 obj "
          "| 3 obj |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        run = Path(path)
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        if first.get("step") != 0 or "eval" not in first:
            raise SystemExit(f"{run}: metrics.jsonl does not start with the step-0 validation evaluation")
        start = first["eval"]["p_at_1"]
        for f in sorted(run.glob("val_select*.json"), key=lambda f: (len(f.name), f.name)):
            d = json.loads(f.read_text())
            cut = (d["p_at_1"] - start) / (1 - start)
            print(f"| {label or run.name} | {f.name} | {d['p_at_1']:.3f} | {100 * cut:.1f}% | {d['wellformed']:.3f} | "
                  f"{d['faithful']:.3f} | {d['faithful_1obj']:.3f} | {d['faithful_2obj']:.3f} | "
                  f"{d['faithful_3obj']:.3f} |")


if __name__ == "__main__":
    main()
