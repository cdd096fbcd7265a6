"""Hyperparameter search with Ray Tune: one raycap run per trial, validation metrics reported at every
evaluation, ASHA stopping the worst trials, the objective respecting caption quality (`raycap.search.results`).

Where a trial's work runs (`search.trial_runtime`):

- `local` (default): the single-process reference loop inside the trial (`run_search`'s `local_trainer`, which
  the entry point passes in: the Ray runtime does not import the reference loop), one placement bundle of
  `cpus_per_trial`. It computes the same updates as the Ray runtime (tested) without its actors, DeepSpeed
  start-up and weight movement, so on a few cores it gives more trials per minute: measured on 2 cores by
  `benchmarks/tune_trials.py` (benchmarks/RESULTS.md). The default for laptops and small models.
- `ray`: the Ray runtime (controller + rollout, reward and DeepSpeed learner actors) with the whole run's
  resources declared to Tune as one placement group per trial: the trial's own process in the first bundle,
  one bundle per actor after it (`resources.trial_bundles`), so Tune never starts a trial the cluster cannot
  hold and the actors of concurrent trials never compete. For GPU clusters, where a trial's roles need
  their own GPUs.

The images and their frozen embeddings are opened once by the driver and reach every trial through the
object store (no node needs the embedding cache's disk). A trial's run dir is its own scratch directory;
at each evaluation the step's checkpoint (with the run's config and log) goes to Tune as a checkpoint, which
Tune keeps at the search's storage location (a local path or a `pyarrow.fs` URI), so an interrupted search
resumes its trials from their last evaluation and the best captioner is read back from there.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from raycap.config import RunConfig
from raycap.errors import UserError
from raycap.search.results import Objective, mark_pareto, plot_pareto, write_table
from raycap.search.space import SearchSpace

STATE_FILE = "search.json"  # OUT/search.json: what --resume needs to rebuild the trainable
METRICS = ("p_at_1", "wellformed", "faithful", "precision", "multi_object")
CONTROLLER_CPUS = 0.25  # the trial process of a `ray` trial: the controller loop, which waits on its actors


def trial_config(space: SearchSpace, base: dict, drawn: dict, cpus: float) -> RunConfig:
    """A trial's run config: `base` with its drawn values, a checkpoint at every evaluation (each becomes the
    trial's Tune checkpoint), no per-trial report, and the trial's threads: a local trial's CPUs (a config's
    `threads` is for a run that has the machine to itself: two trials of `threads: 2` on 2 cores ran 4x slower
    per update than two of 1 thread, their OpenMP threads spinning against each other)."""
    cfg = space.trial_config(drawn, base)
    updates = {"checkpoint_every": cfg.eval.every, "eval": cfg.eval.model_copy(update={"report": False})}
    if space.search.trial_runtime == "local":
        updates["threads"] = max(1, math.ceil(cpus - 1e-9))
    else:
        updates["threads"] = None  # each actor its CPU share (raycap.runtime.resources.actor_threads)
    return cfg.model_copy(update=updates)


def _run_trial(drawn: dict, *, space: SearchSpace, base: dict, objective: Objective, splits, local_trainer) -> None:
    """The trainable: one raycap run of `drawn`, reporting every validation evaluation to Tune; a `local` trial
    runs `local_trainer` (`raycap.local_trainer.LocalTrainer`)."""
    from ray import tune

    from raycap.progress import quiet_library_progress

    quiet_library_progress()
    cfg = trial_config(space, base, drawn, space.search.cpus_per_trial)
    run_dir = Path(tempfile.mkdtemp(prefix="raycap-trial-"))
    try:
        restored = tune.get_checkpoint()
        if restored is not None:  # a resumed search: continue from the trial's last evaluation
            restored.to_directory(str(run_dir))

        def on_eval(step: int, metrics: dict) -> None:
            report = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            report |= {"step": step, "objective": objective.value(metrics), "feasible": objective.feasible(metrics)}
            if step == 0:
                tune.report(report)
                return
            with tempfile.TemporaryDirectory(prefix="raycap-ckpt-") as d:
                snapshot(run_dir, step, Path(d))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

        quiet = lambda *_: None  # noqa: E731 — Tune shows the reported metrics; the run's own lines are noise
        if space.search.trial_runtime == "ray":
            from raycap.runtime.controller import Controller

            trainer = Controller(cfg, run_dir, log=quiet, splits=splits)
            try:
                trainer.fit(on_eval=on_eval, test_at_end=False)
            finally:
                trainer.shutdown()
        else:
            local_trainer(cfg, run_dir, log=quiet, splits=splits).fit(on_eval=on_eval, test_at_end=False)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def snapshot(run_dir: Path, step: int, dest: Path) -> None:
    """A run dir in miniature: config, runtime, log up to `step`, and checkpoint step-`step` (resumable, and
    loadable as a captioner: the checkpoint itself for the local runtime, its captioner/ for the Ray one)."""
    from raycap.runlog import RUN_FILE, read_records

    for name in ("config.json", RUN_FILE):
        shutil.copy2(run_dir / name, dest / name)
    records = [r for r in read_records(run_dir / "metrics.jsonl") if r["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copytree(run_dir / "checkpoints" / f"step-{step}", dest / "checkpoints" / f"step-{step}")


def captioner_of(run: Path) -> Path:
    """The loadable captioner inside a snapshot's last checkpoint."""
    step = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return step / "captioner" if (step / "captioner").is_dir() else step


def tune_domain(param):
    from ray import tune

    if param.kind == "loguniform":
        return tune.loguniform(*param.args)
    if param.kind == "uniform":
        return tune.uniform(*param.args)
    if param.kind == "randint":
        return tune.randint(*param.args)
    return tune.choice(param.args)


def trainable(space: SearchSpace, base: dict, objective: Objective, splits, local_trainer):
    """The trial function with its parameters (through the object store) and its resources declared to Tune."""
    from ray import tune

    fn = tune.with_parameters(_run_trial, space=space, base=base, objective=objective, splits=splits,
                              local_trainer=local_trainer)
    s = space.search
    if s.trial_runtime == "ray":
        from raycap.runtime.resources import trial_bundles

        rt = RunConfig.model_validate(base).runtime
        return tune.with_resources(fn, tune.PlacementGroupFactory(trial_bundles(rt, CONTROLLER_CPUS)))
    return tune.with_resources(fn, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with every file path absolute: a trial runs in Tune's working directory, not the user's."""
    def fix(p):
        return str(Path(p).expanduser().resolve()) if p and "://" not in str(p) else p

    data = cfg.data.model_copy(update={k: fix(getattr(cfg.data, k)) for k in ("path", "image_root", "captions")})
    ret = cfg.retriever
    ret = ret.model_copy(update={"path": fix(ret.path),
                                 "pretrained": fix(ret.pretrained) if ret.pretrained and Path(ret.pretrained).is_file()
                                 else ret.pretrained})
    cap = cfg.captioner.model_copy(update={"path": fix(cfg.captioner.path)})
    return cfg.model_copy(update={"data": data, "retriever": ret, "captioner": cap})


def run_search(space: SearchSpace, base: RunConfig, out: Path, storage: str, objective: Objective,
               resume: bool = False, name: str = "search", log=print, *, local_trainer) -> dict:
    """Run (or resume) the search, Tune's experiment `name` under `storage`, and write its results under `out`;
    returns the summary written to OUT/summary.json (the table rows, the best trial, its test metrics and where
    everything is). `local_trainer`: the class that runs a `local` trial (`raycap.local_trainer.LocalTrainer`,
    passed in by the entry point)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from raycap.inputs import load_retriever, open_splits
    from raycap.runtime import resources

    # a trial's checkpoint at each evaluation snapshots the experiment's state; that is intended, not a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    base = absolute_paths(base)
    base_dict = base.model_dump(mode="json")
    owns_ray, dashboard = resources.start_ray(base.runtime)
    try:
        if dashboard:
            log(f"Ray dashboard: http://{dashboard}  (trials and their actors under Jobs and Cluster)")
        splits = open_splits(base, load_retriever(base.retriever), log)
        fn = trainable(space, base_dict, objective, ray.put(splits), local_trainer)
        path = _join(storage, name)
        if resume:
            if not tune.Tuner.can_restore(path):
                raise UserError(f"--resume: no search to resume at {path}")
            tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            s = space.search
            tuner = tune.Tuner(
                fn, param_space={p.name: tune_domain(p) for p in space.params},
                tune_config=tune.TuneConfig(
                    metric="objective", mode="max", num_samples=s.num_samples,
                    search_alg=BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed),
                    scheduler=ASHAScheduler(time_attr="step", max_t=base.rl.steps, grace_period=s.grace_period,
                                            reduction_factor=s.reduction_factor)),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        # Ctrl-C (SIGINT) ends fit() early with Tune's state saved, then marks every trial terminated in memory:
        # the saved state tells which were still pending or running (and so are resumed)
        saved = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
        unfinished = [t for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]
        if unfinished:  # stopped by Ctrl-C (SIGINT): Tune saved its state, and the trials their checkpoints
            return {"interrupted": True, "unfinished": len(unfinished), "storage": grid.experiment_path}
        return summarise(grid, space, base, out, objective, dashboard, log)
    finally:
        if owns_ray:
            ray.shutdown()


def _join(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name if "://" in storage else str(Path(storage) / name)


def summarise(grid, space: SearchSpace, base: RunConfig, out: Path, objective: Objective, dashboard, log) -> dict:
    """The table, the Pareto plot, the best trial's config and captioner in OUT/best/, its test evaluation
    (once) beside the supervised captioner's, and its report."""
    rows, results = [], {}
    for i, result in enumerate(grid):
        m = result.metrics or {}
        trial = str(m.get("trial_id") or i)
        row = {"trial": trial, **{p.name: _show(result.config.get(p.name)) for p in space.params}}
        row |= {k: m.get(k) for k in METRICS} | {"step": m.get("step"), "objective": m.get("objective")}
        row["feasible"] = bool(m) and objective.feasible(m)
        row["status"] = ("error" if result.error else "completed" if m.get("step") == base.rl.steps
                         else "stopped early" if m else "not started")
        rows.append(row)
        results[trial] = result
    mark_pareto(rows)
    ranked = sorted((r for r in rows if isinstance(r.get("objective"), float)), key=lambda r: -r["objective"])
    best = ranked[0] if ranked else None
    if best is not None:
        best["best"] = True
    out.mkdir(parents=True, exist_ok=True)
    columns = ["trial", *[p.name for p in space.params], "step", "status", *METRICS, "objective", "feasible", "pareto"]
    rows.sort(key=lambda r: -(r["objective"] if isinstance(r.get("objective"), float) else -math.inf))
    md = write_table(rows, columns, out / "results.csv", out / "results.md")
    plotted = plot_pareto(rows, out / "pareto.png", f"{len(rows)} trials: {objective.describe()}")
    log(md)
    summary = {"objective": objective.describe(), "trials": rows, "table": str(out / "results.md"),
               "csv": str(out / "results.csv"), "plot": str(out / "pareto.png") if plotted else None,
               "storage": grid.experiment_path, "dashboard": f"http://{dashboard}" if dashboard else None}
    unmeasured = sorted({k for r in results.values() if r.metrics for k in objective.unmeasured(r.metrics)})
    if unmeasured:
        summary["note"] = f"not measured on this dataset, so not applied as a constraint: {', '.join(unmeasured)}"
        log("note: " + summary["note"])
    if best is None:
        log("no trial reported a validation evaluation: nothing to choose")
    elif not best["feasible"]:
        log("warning: no trial met the quality constraints; the best infeasible trial is shown, not chosen")
        summary["best"] = None
    else:
        summary["best"] = export_best(results[best["trial"]], base, best, out / "best", log)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _show(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, dict) else v


def export_best(result, base: RunConfig, row: dict, dest: Path, log) -> dict:
    """OUT/best/: config.yaml (the chosen run config: rerun it with `python -m raycap.train --config`),
    captioner/, run/ (its run dir, which `python -m raycap.report` reads), test_metrics.json and .md (the test
    split, read here once), run/report/index.html."""
    from raycap.report.gallery import compare_on_test

    if dest.exists():
        shutil.rmtree(dest)
    run = dest / "run"
    result.checkpoint.to_directory(str(run))
    cfg = RunConfig.model_validate(json.loads((run / "config.json").read_text()))
    shutil.copytree(captioner_of(run), dest / "captioner")
    shutil.copytree(dest / "captioner", run / "final")
    chosen = cfg.model_copy(update={"checkpoint_every": base.checkpoint_every, "eval": base.eval,
                                    "threads": base.threads})
    (dest / "config.yaml").write_text(yaml.safe_dump(chosen.model_dump(mode="json"), sort_keys=False))
    log(f"best trial {row['trial']} (val P@1 {row['p_at_1']:.3f}): evaluating it once on the test split")
    gallery = cfg.eval.report_gallery if base.eval.report else 0  # one test evaluation serves table and report
    test = compare_on_test(cfg, run / "final", run / "report", gallery, log)
    before, after = test.before, test.after
    (run / "final_metrics.json").write_text(json.dumps(after | {"split": "test", "updates": row["step"]}, indent=2))
    keys = [k for k in ("p_at_1", "wellformed", "faithful", "precision", "recall", "multi_object", "clip_score")
            if k in after]
    md = "| test split | supervised | best trial |\n| --- | --- | --- |\n" + "".join(
        f"| {k} | {before.get(k, float('nan')):.3f} | {after[k]:.3f} |\n" for k in keys)
    (dest / "test_metrics.json").write_text(json.dumps({"supervised": before, "best": after}, indent=2))
    (dest / "test_metrics.md").write_text(md)
    log(md)
    out = {"trial": row["trial"], "config": str(dest / "config.yaml"), "captioner": str(dest / "captioner"),
           "test": {k: after[k] for k in keys}, "supervised_test": {k: before.get(k) for k in keys}}
    if base.eval.report:
        from raycap.report import build_report

        try:
            out["report"] = str(build_report(run, gallery=gallery, log=lambda *_: None, comparison=test))
        except Exception as e:  # noqa: BLE001 — the search's results are written; the report can be rebuilt
            log(f"warning: the report failed ({type(e).__name__}: {e}); retry with python -m raycap.report {run}")
    return out
