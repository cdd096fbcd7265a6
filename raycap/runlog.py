"""A run directory's log: metrics.jsonl (one record per step) and its scalars in the trackers of
`runtime.loggers` (TensorBoard, W&B, MLflow: raycap.tracking), shared by both runtimes."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from raycap.config import dotted_fields
from raycap.errors import UserError
from raycap.tracking import Trackers, check_loggers


SHOWN = (("p_at_1", "P@1"), ("wellformed", "wellformed"), ("faithful", "faithful"), ("precision", "precision"),
         ("recall", "recall"), ("mean_length", "length"))  # what a validation line shows (metrics.jsonl has all)


def metrics_line(metrics: dict) -> str:
    """An evaluation's headline numbers, rounded, for a log line (`P@1 0.656, wellformed 0.998, ...`); a collapse
    warning, when there is one, follows."""
    parts = []
    for key, label in SHOWN:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and v == v:  # NaN (no claims to check) is left out
            parts.append(f"{label} {v:.1f}" if key == "mean_length" else f"{label} {v:.3f}")
    warning = metrics.get("collapse_warning")
    return ", ".join(parts) + (f" ({warning})" if warning else "")


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (what a SIGKILL or a full disk leaves mid-write) is
    dropped with a warning on stderr; an unreadable line before the last one is a UserError naming it."""
    lines = Path(path).read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if i == last:
                print(f"warning: {path}: dropping its torn last line {i + 1} ({str(e).splitlines()[0]}), "
                      "left by an interrupted write; that step is redone", file=sys.stderr)
                continue
            raise UserError(f"{path}: line {i + 1} is not a valid JSON record ({str(e).splitlines()[0]}); "
                            "fix or delete that line to resume, or use a new --out") from None
        records.append(record)
    return records


class RunLog:
    """Opening at `step` (a resumed run) drops the records of later steps, which a killed run wrote after its
    last checkpoint and the resumed run will redo, so the log reads as one run; the trackers of `config`'s
    `runtime.loggers` (TensorBoard alone without a config) resume their runs as far as each allows
    (raycap.tracking)."""

    def __init__(self, out: Path, step: int = 0, config=None):
        path = Path(out) / "metrics.jsonl"
        if path.exists():
            kept = [json.dumps(r) for r in (read_records(path) if step else ())  # a fresh start keeps none
                    if r["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
        self.trackers = Trackers(out, config, step)
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        """Append a record (must hold "step"); its numbers, and those of record["eval"], go to the trackers."""
        self.trackers.log(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self, failed: bool = False) -> None:
        """`failed`: the run stopped on an error (trackers that have such a state mark their run so)."""
        self.trackers.close(failed)
        self.file.close()


def last_checkpoint(out: Path, marker: str) -> Path | None:
    """The newest `out/checkpoints/step-N` holding `marker`, the file a checkpoint writes last (None if none)."""
    done = [p for p in (Path(out) / "checkpoints").glob("step-*") if (p / marker).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


CHECKPOINT_MARKERS = {"local": "trainer_state.pt", "ray": "controller.pt"}  # each runtime's checkpoint marker
RUN_FILE = "run.json"  # which runtime made the run dir
CHANGES_FILE = "config_changes.jsonl"  # one record per resume with a changed config


def config_diff(old: dict, config) -> dict[str, tuple]:
    """{dotted field: (old value, new value)} between a run dir's config.json and `config` (a pydantic model);
    fields the old config lacks take their defaults."""
    try:
        old = type(config).model_validate(old).model_dump(mode="json")
    except Exception:  # noqa: BLE001 — a config from an older raycap: compare what is there
        pass
    a, b = dotted_fields(old), dotted_fields(config.model_dump(mode="json"))
    missing = "(unset)"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if a.get(k, missing) != b.get(k, missing)}


def _recorded_runtime(out: Path) -> str | None:
    try:
        return json.loads((out / RUN_FILE).read_text())["runtime"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name, marker in CHECKPOINT_MARKERS.items():  # a run dir from before run.json: its checkpoints tell
        if last_checkpoint(out, marker) is not None:
            return name
    return None


@dataclass
class RunDirPlan:
    """What `check_run_dir` found: the run dir, the run's config and runtime, the config changes to log (a resume
    with a new config or more steps), and the metrics records to keep when a torn last line is to be dropped."""
    out: Path
    config: object
    runtime: str
    changes: dict
    records: list | None = None


def check_run_dir(out: Path, config, runtime: str, allow_new_config: bool = False) -> RunDirPlan:
    """Check a run dir before anything loads, writing nothing (`record_run_dir` writes, once every other check
    has passed: a refused run leaves the dir as it was, so the corrected retry of the same --out is a fresh start).

    A run dir that already holds a run (metrics or checkpoints) is resumed only by the runtime that made it
    and with the config it was made with: anything else is a one-line UserError naming the differences, unless
    `allow_new_config` (`--resume-with-new-config`), which logs the change in `config_changes.jsonl`. A larger
    `rl.steps` alone extends the run and is allowed (and logged); fewer steps than the last checkpoint holds are
    refused either way."""
    out = Path(out)
    check_loggers(config.runtime)  # a tracker's missing package or unusable store, before anything starts
    started = (out / "metrics.jsonl").is_file() or any((out / "checkpoints").glob("step-*"))
    plan = RunDirPlan(out, config, runtime, {})
    if started:
        recorded = _recorded_runtime(out)
        if recorded is not None and recorded != runtime:
            raise UserError(f"{out}: this run dir was made by the {recorded} runtime and --runtime {runtime} "
                            f"cannot resume it; re-run with --runtime {recorded} or use a new --out")
        last = last_checkpoint(out, CHECKPOINT_MARKERS[runtime])
        done = int(last.name.split("-")[1]) if last else 0
        if config.rl.steps < done:
            raise UserError(f"{out}: rl.steps={config.rl.steps} but its checkpoint {last.name} already holds {done} "
                            f"updates; pass rl.steps >= {done} or use a new --out")
        changes: dict = {}
        if (out / "config.json").is_file():
            try:
                old = json.loads((out / "config.json").read_text())
            except ValueError:
                raise UserError(f"{out / 'config.json'}: not valid JSON; fix it or use a new --out") from None
            changes = config_diff(old, config)
        extension = set(changes) <= {"rl.steps"} and (not changes or changes["rl.steps"][1] > changes["rl.steps"][0])
        if changes and not extension and not allow_new_config:
            listed = ", ".join(f"{k}: {a} -> {b}" for k, a, b in ((k, *v) for k, v in changes.items()))
            raise UserError(f"{out}: this run dir was made with a different config ({listed}); pass "
                            "--resume-with-new-config to continue with the new one")
        plan.changes = changes
        metrics = out / "metrics.jsonl"
        if done and metrics.is_file():  # read now, before anything loads: a torn middle line is refused here and
            records = read_records(metrics)  # a torn last line dropped (with a warning) once
            if len(records) < sum(1 for line in metrics.read_text().splitlines() if line.strip()):
                plan.records = records
    return plan


def record_run_dir(plan: RunDirPlan) -> None:
    """After every check: the run dir made, a dropped torn metrics line removed, a config change logged, the run's
    config and runtime recorded (config.json, run.json)."""
    out, config, runtime = plan.out, plan.config, plan.runtime
    out.mkdir(parents=True, exist_ok=True)
    if plan.records is not None:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plan.records))
    if plan.changes:
        import time

        with (out / CHANGES_FILE).open("a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runtime": runtime,
                                "changes": {k: list(v) for k, v in plan.changes.items()}}) + "\n")
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    (out / RUN_FILE).write_text(json.dumps({"runtime": runtime}) + "\n")


def prepare_run_dir(out: Path, config, runtime: str, allow_new_config: bool = False) -> None:
    """`check_run_dir`, then `record_run_dir` at once (for callers with nothing else to check in between)."""
    record_run_dir(check_run_dir(out, config, runtime, allow_new_config))


def run_updates(cfg, out: Path, start: int, update, evaluate, checkpoint, log=print, on_record=None,
                skipped: dict | None = None, on_eval=None, test_at_end: bool = True) -> dict:
    """The loop both runtimes share: evaluate at step 0, then `update(step) -> record` for each remaining step
    with evaluations every `eval_every`, checkpoints every `checkpoint_every` (and at the end), the run log,
    and a progress bar (whole lines in a log file: raycap.progress). `evaluate(split)`: the evaluations during
    the run read the validation split (what a user may choose settings on), greedily; the test split is read
    once, at the end, with `eval.decoding` (`evaluate(split, decoding)` decodes as `decoding` says, by default
    greedy on val and `eval.decoding` on test). Returns that final test evaluation with `rl_seconds` and
    `updates`, its captions written to RUN/final_captions.json. `skipped`: images left out per split
    (`data.on_bad_image: skip`), recorded at step 0 and in the final metrics. `on_eval(step, metrics)` is called
    after each validation evaluation is logged (and the step's checkpoint written); `test_at_end=False` (a
    trial of a search, which must choose on validation) returns the last validation evaluation instead, which
    then decodes with `eval.decoding`, as the run would ship, so the search chooses on that decoding."""
    import time

    from raycap.progress import progress

    runlog = RunLog(out, start, cfg)
    try:
        last_val = None
        if start == 0:
            initial = evaluate("val")
            runlog.write({"step": 0, "eval": initial} | ({"skipped_images": skipped} if skipped else {}))
            log("step 0 (supervised captioner, val): " + metrics_line(initial))
            last_val = initial
            if on_eval:
                on_eval(0, initial)
        t0 = time.time()
        bar = progress(range(start, cfg.rl.steps), initial=start, total=cfg.rl.steps, desc="rl")
        for step in bar:
            t = time.time()
            record = update(step)
            record.setdefault("step_seconds", round(time.time() - t, 3))
            record["step"] = step + 1
            if on_record:
                on_record(record)
            bar.set_postfix(reward=f"{record.get('reward_mean', record.get('clip_cos', 0)):.3f}",
                            p1=f"{record['train_p_at_1']:.2f}", kl=f"{record['kl']:.3f}")
            if (step + 1) % cfg.eval.every == 0 or step + 1 == cfg.rl.steps:
                # a trial's last evaluation, which its search chooses on, decodes as the run would ship
                shipped = not test_at_end and step + 1 == cfg.rl.steps and cfg.eval.decoding != "greedy"
                record["eval"] = evaluate("val", cfg.eval.decoding) | {"decoding": cfg.eval.decoding} if shipped \
                    else evaluate("val")
                log(f"step {step + 1} (val{', ' + cfg.eval.decoding if shipped else ''}): "
                    + metrics_line(record["eval"]))
            runlog.write(record)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.rl.steps:
                checkpoint(step + 1)
            if "eval" in record:
                last_val = record["eval"]
                if on_eval:
                    on_eval(step + 1, record["eval"])
        if test_at_end:
            last = evaluate("test") | {"split": "test"}
            captions = last.pop("captions", None)
            if captions is not None:  # COCO results format, beside final_metrics.json
                (Path(out) / "final_captions.json").write_text(json.dumps(captions))
        else:
            last = dict(last_val if last_val is not None else evaluate("val")) | {"split": "val"}
        final = last | {"rl_seconds": round(time.time() - t0, 1), "updates": max(0, cfg.rl.steps - start)}
        if skipped is not None:
            final["skipped_images"] = skipped
    except BaseException:  # the trackers' runs are closed (marked failed) also on an error or Ctrl-C
        runlog.close(failed=True)
        raise
    runlog.close()
    return final
