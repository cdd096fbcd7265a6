"""Hyperparameter search: `python -m raycap.tune [--space NAME|PATH] [--config NAME|PATH] [--num-samples N]
[--out DIR] [--resume]`.

Ray Tune runs one raycap run per trial, drawn from a search space (`raycap/tune_spaces/*.yaml`: `demo`, the
default, `discritune`, `gumbel`; or any YAML path), reports each trial's validation metrics at every
evaluation and stops the worst trials early with ASHA. The objective respects caption quality: by default the
validation P@1 among trials whose validation `wellformed` is at least 0.95 (`--min-wellformed`;
`--min-faithful` adds faithfulness as a constraint on the world); trials below a constraint rank after every
trial that meets them.

At the end, OUT/ holds results.csv and results.md (every trial: its values, how far it got, P@1, wellformed,
faithful, whether it is on the Pareto front of P@1 against faithfulness), pareto.png, and best/: the chosen
trial's config.yaml (rerun it with `python -m raycap.train --config OUT/best/config.yaml`), its captioner,
its test-split evaluation beside the supervised captioner's (the test split is read here, once) and the
HTML report of its run. Tune's own records and the trials' checkpoints go to `--storage` (default OUT; a
shared path or a `pyarrow.fs` URI such as s3://bucket/prefix on a cluster); `--resume` continues an
interrupted search from there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_dir
from raycap.progress import quiet_library_progress
from raycap.commands import prog

INTERRUPTED = 130  # the exit code of a search stopped by Ctrl-C (resumable with --resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.tune"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="named search space or YAML path (default: demo)")
    p.add_argument("--config", help="run config the trials start from (default: the one the space names)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the space's search section (search.num_samples=4) or fix a run "
                        "config field for every trial (rl.steps=100)")
    p.add_argument("--num-samples", type=int, help="trials to draw (default: the space's search.num_samples)")
    p.add_argument("--out", type=Path, default=Path("runs/tune"), help="where the results go (default: runs/tune)")
    p.add_argument("--storage", help="Tune's storage location: a path every node can reach or a pyarrow.fs URI "
                                     "such as s3://bucket/prefix (default: $RAYCAP_STORAGE, else OUT)")
    p.add_argument("--min-wellformed", type=float, default=0.95,
                   help="trials below this validation wellformed are not chosen (default 0.95; -1 turns it off)")
    p.add_argument("--min-faithful", type=float, default=None,
                   help="also require this validation faithfulness (world only; default: no constraint)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search of --out (or --storage)")
    p.add_argument("--list-spaces", action="store_true", help="print the named search spaces and exit")
    return p


def _objective(args):
    from raycap.search.results import Objective

    for flag, v in (("--min-wellformed", args.min_wellformed), ("--min-faithful", args.min_faithful)):
        if v is not None and v > 1:
            raise UserError(f"{flag} {v}: a share, at most 1")
    return Objective(min_wellformed=None if args.min_wellformed < 0 else args.min_wellformed,
                     min_faithful=args.min_faithful)


def _search_state(args) -> dict:
    """What the search was started with: OUT/search.json, written at the start, read back by --resume."""
    state_file = args.out / "search.json"
    if args.resume:
        if not state_file.is_file():
            raise UserError(f"--resume: {state_file} not found: --out names no search started by raycap.tune")
        state = json.loads(state_file.read_text())
        for flag, key in (("--space", "space"), ("--config", "config")):
            given = getattr(args, key)
            if given is not None and given != state[key]:
                raise UserError(f"--resume: {flag} {given} differs from the search's {state[key]!r}; leave it out")
        return state
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: at least 1")
    sets = list(args.set) + ([f"search.num_samples={args.num_samples}"] if args.num_samples else [])
    storage = args.storage or os.environ.get("RAYCAP_STORAGE") or str(args.out.resolve())
    # in OUT the experiment is OUT/search; in a shared location it is named after OUT, so searches do not collide
    name = "search" if storage == str(args.out.resolve()) else args.out.resolve().name
    return {"space": args.space or "demo", "config": args.config, "set": sets, "storage": storage, "name": name,
            "min_wellformed": args.min_wellformed, "min_faithful": args.min_faithful}


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        from raycap.search.space import named_spaces

        print("\n".join(named_spaces()))
        return None
    with exit_on_user_error():
        check_output_dir(args.out, "--out")
        state = _search_state(args)
        args.min_wellformed, args.min_faithful = state["min_wellformed"], state["min_faithful"]
        objective = _objective(args)
        from raycap.search.space import load_space
        from raycap.tracking import check_loggers
        from raycap.train import check_inputs_exist

        space = load_space(state["space"], state["config"], state["set"])
        base = space.base_config()
        check_inputs_exist(base)
        check_loggers(base.runtime)  # each trial logs to the trackers: a missing package is refused before any
        from raycap.memory import check_learner_fits

        check_learner_fits(base, space.search.trial_runtime)  # the base config's learner, before any trial
        if not args.resume and (args.out / "search.json").exists():
            raise UserError(f"--out {args.out}: holds a search already; --resume continues it, or use a new --out")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "search.json").write_text(json.dumps(state, indent=2))
        quiet_library_progress()
        from raycap.local_trainer import LocalTrainer
        from raycap.runtime.tuning import run_search

        print(f"search space {space.path}: {len(space.params)} parameters ({', '.join(p.name for p in space.params)}), "
              f"{space.search.num_samples} trials, {space.search.max_concurrent} at a time, trials on the "
              f"{space.search.trial_runtime} runtime; objective: {objective.describe()}")
        summary = run_search(space, base, args.out, state["storage"], objective, resume=args.resume,
                             name=state["name"], local_trainer=LocalTrainer)
    if summary.get("interrupted"):
        print(f"the search was interrupted with {summary['unfinished']} trials unfinished; its state is in "
              f"{summary['storage']}: python -m raycap.tune --out {args.out} --resume continues it", file=sys.stderr)
        sys.exit(INTERRUPTED)
    print(f"results: {summary['table']} (and {Path(summary['csv']).name})"
          + (f", Pareto plot: {summary['plot']}" if summary["plot"] else ""))
    best = summary.get("best")
    if best:
        print(f"best trial {best['trial']}: config {best['config']}, captioner {best['captioner']}"
              + (f", report {best['report']}" if best.get("report") else ""))
    print(f"Tune's records and checkpoints: {summary['storage']}"
          + (f"; Ray dashboard (while the search ran): {summary['dashboard']}" if summary.get("dashboard") else ""))
    return summary


if __name__ == "__main__":
    main()
