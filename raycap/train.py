"""One RL run: `python -m raycap.train --config world-demo --out DIR [--set key=value ...]`.

`--config` is a named config shipped with raycap (see `--list-configs`) or a YAML path, with sections data (the
images: the world or a dataset on disk), retriever, captioner, rl (the algorithm), runtime and eval; `--set`
overrides any field, e.g. `--set rl.algorithm.kl_coef=0.3` (raycap.config.RunConfig). The run dir gets config.json,
metrics.jsonl, TensorBoard logs, checkpoints every N steps (resumed automatically), final/ (captioner +
tokenizer) and final_metrics.json.

By default the run goes on Ray (`raycap.runtime`: rollout workers, a reward service and DeepSpeed learner
ranks, placed by the config's `runtime` section; a local Ray is started unless `runtime.address` names a
cluster); `--runtime local` runs the single-process reference loop, which computes the same updates.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from raycap.config import load_config, named_configs
from raycap.errors import exit_on_user_error
from raycap.paths import check_output_dir
from raycap.progress import quiet_library_progress
from raycap.tracking import log_report_artifact
from raycap.commands import prog


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.train"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="world-demo", help="named config or YAML path (default: world-demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", type=Path, help="run directory (resumed if it holds checkpoints)")
    p.add_argument("--runtime", choices=["ray", "local"], default="ray",
                   help="ray (default): controller + rollout, reward and DeepSpeed learner actors on Ray; "
                        "local: the single-process reference loop")
    p.add_argument("--resume-with-new-config", action="store_true",
                   help="resume a run dir made with a different config, continuing with this one (the change "
                        "is logged in RUN/config_changes.jsonl); without it such a resume is refused")
    p.add_argument("--list-configs", action="store_true", help="print the named configs and exit")
    return p


def run_local(config, out: Path, allow_new_config: bool = False) -> dict:
    from raycap.local_trainer import LocalTrainer

    return LocalTrainer(config, out, allow_new_config=allow_new_config).fit()


def run_ray(config, out: Path, allow_new_config: bool = False) -> dict:
    from raycap.runtime.controller import Controller

    controller = Controller(config, out, allow_new_config=allow_new_config)
    try:
        return controller.fit()
    finally:
        controller.shutdown()


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.list_configs:
        print("\n".join(named_configs()))
        return None
    with exit_on_user_error():
        if args.out is None:
            from raycap.errors import UserError
            raise UserError("--out: a run directory is required")
        check_output_dir(args.out, "--out")  # before the config, Ray and the models load
        config = load_config(args.config, args.set)
        try:
            final = execute(config, args.out, args.runtime, args.resume_with_new_config)
        except KeyboardInterrupt:
            print(interrupted_line(args.out, argv if argv is not None else sys.argv[1:], config.rl.steps),
                  file=sys.stderr)
            raise SystemExit(130) from None
    print(f"run dir: {args.out}  (final captioner: {args.out / 'final'}, metrics: {args.out / 'metrics.jsonl'})")
    return final


def interrupted_line(out: Path, argv: list[str], steps_planned: int | None = None) -> str:
    """What Ctrl-C prints: the last update the run logged, its last complete checkpoint, the command that resumes
    (or, when training had finished, that the same command redoes the test table and the report)."""
    from raycap.runlog import CHECKPOINT_MARKERS, last_checkpoint, read_records

    steps = [r["step"] for r in read_records(out / "metrics.jsonl")] if (out / "metrics.jsonl").is_file() else []
    kept = [c for c in (last_checkpoint(out, m) for m in CHECKPOINT_MARKERS.values()) if c is not None]
    checkpoint = max((int(c.name.split("-")[1]) for c in kept), default=None)
    command = f"{prog('raycap.train')} {shlex.join(argv)}"
    if steps_planned is not None and checkpoint == steps_planned and (out / "final_metrics.json").is_file():
        return (f"stopped after training (Ctrl-C): all {steps_planned} updates and the test metrics are saved; "
                f"the same command redoes the test table and the report: {command}")
    saved = f"last checkpoint at step {checkpoint}" if checkpoint is not None else "no checkpoint yet"
    return f"stopped at step {max(steps, default=0)} (Ctrl-C); {saved}; resume with: {command}"


def execute(config, out: Path, runtime: str = "ray", allow_new_config: bool = False) -> dict:
    """The run of a loaded config in `out` on `runtime` ("ray" or "local"), then its report; the final
    (test) metrics. What `main` and the Python API (`raycap.api.train`) share."""
    check_inputs_exist(config)
    from raycap.memory import check_learner_fits

    check_learner_fits(config, runtime)  # from the captioner's config files: before any model loads
    quiet_library_progress()
    if "tensorboard" in config.runtime.loggers:
        print(f"curves: tensorboard --logdir {out / 'tensorboard'}")
    run = run_local if runtime == "local" else run_ray
    final = run(config, out, allow_new_config=allow_new_config)
    from raycap.runlog import metrics_line

    print(f"test ({final.get('n_images', '?')} images): {metrics_line(final)}  (all metrics: "
          f"{out / 'final_metrics.json'})")
    comparison = None
    if config.eval.test_table or config.eval.report:
        comparison = compare_final(config, out)
    if comparison is not None and config.eval.test_table:
        from raycap.report.gallery import format_test_table

        final["test_table"] = comparison.headline()
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2))
        print(format_test_table(final["test_table"]))
    if config.eval.report:
        write_report(out, config.eval.report_gallery, comparison)
        log_report_artifact(out, config)  # to the W&B / MLflow runs of runtime.loggers
    return final


def compare_final(config, out: Path):
    """The test comparison of the run's final captioner with the supervised one (`gallery.compare_on_test`,
    its gallery images into RUN/report when the report is wanted; the fine-tuned captioner's row with
    `eval.decoding` is the run's own test captions, RUN/final_captions.json), or None with a warning if it fails:
    the run is complete whatever happens here."""
    from raycap.report.gallery import compare_on_test

    gallery = config.eval.report_gallery if config.eval.report else 0
    shipped = out / "final_captions.json"
    known = {("fine-tuned", config.eval.decoding): [e["caption"] for e in json.loads(shipped.read_text())]} \
        if shipped.is_file() else None
    try:
        return compare_on_test(config, out / "final", out / "report", gallery, log=lambda *_: None, known=known)
    except Exception as e:  # noqa: BLE001 — the run's results are saved; the table and report can be rebuilt
        print(f"warning: the test comparison failed ({type(e).__name__}: {e}); the run is complete, retry with "
              f"{prog('raycap.report')} {out}", file=sys.stderr)
        return None


def check_inputs_exist(config) -> None:
    """Before Ray or any model starts: the files a config names (dataset, captioner, retriever directory) are
    there, or one line names the first one missing and, for a named config, what it needs and where it goes."""
    from raycap.errors import UserError

    wanted = []
    if config.data.path is not None:
        wanted.append(("data.path", Path(config.data.path)))
    wanted.append(("captioner.path", Path(config.captioner.path)))
    if config.retriever.path is not None:
        wanted.append(("retriever.path", Path(config.retriever.path)))
    if config.rl.reward.fluency_coef:
        wanted.append(("rl.reward.fluency_head", Path(config.rl.reward.fluency_head)))
    for field, path in wanted:
        if not path.exists():
            hint = f"; this config needs: {config.setup}" if config.setup else ""
            kind = "file or directory" if field == "data.path" else "directory"
            raise UserError(f"{field} {path}: no such {kind}{hint}")
    if config.rl.reward.fluency_coef:
        from raycap.models.fluency import is_fluency_dir

        if not is_fluency_dir(config.rl.reward.fluency_head):
            raise UserError(f"rl.reward.fluency_head {config.rl.reward.fluency_head}: not a fluency model dir (it "
                            "needs raycap_fluency.json, fluency_head.safetensors and text/; `raycap pretrain fluency "
                            "--out DIR` writes one)")
    from raycap.inputs import check_data_sizes, world_split_sizes

    check_data_sizes(config, world_split_sizes(config))  # a world's split sizes are known before anything loads


def write_report(out: Path, gallery: int, comparison=None) -> None:
    """The run's HTML report (`comparison`: its test comparison, when computed already). The run is complete
    whatever happens here, so a failure is a warning that says how to retry, not an error."""
    from raycap.report import build_report

    try:
        page = build_report(out, gallery=gallery, comparison=comparison)
    except Exception as e:  # noqa: BLE001 — the run's results are saved; the report can be rebuilt later
        print(f"warning: the report failed ({type(e).__name__}: {e}); the run is complete, retry with "
              f"{prog('raycap.report')} {out}", file=sys.stderr)
        return
    print(f"report: {page}  (open it in a browser)")


if __name__ == "__main__":
    main()
else:  # `raycap.train(config, out=...)` (the Python API) calls this module
    from raycap.commands import make_callable

    make_callable(__name__, "raycap.api:train")
