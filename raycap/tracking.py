"""Experiment trackers beside metrics.jsonl (`runtime.loggers`): TensorBoard, Weights & Biases and MLflow each get
the same scalars, the run config and, after the run, the report.

- Scalars: a record's numbers (`train/<field>`, and `eval/<field>` from its validation evaluation) at its step, as
  metrics.jsonl holds them (`scalars`).
- Config: W&B gets the nested run config; MLflow gets it flattened to dotted params (`params`: values as JSON,
  strings as they are, cut to PARAM_CHARS characters).
- Report: `log_report_artifact` logs RUN/report/ to each tracker's run once the report is written.

wandb and mlflow are optional packages (`pip install 'raycap[wandb]'`, `'raycap[mlflow]'`), imported only when
enabled; `check_loggers` refuses a missing one with one line before anything loads. W&B's key, entity and mode
come from its environment (WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline), never from the config.

Resume: the tracker runs' ids are kept in RUN/trackers.json, so a resumed run (opened at step > 0) logs to the same
W&B run and MLflow run, and a fresh start (step 0) opens new ones. The steps a killed run logged after its last
checkpoint are redone: TensorBoard purges them (as metrics.jsonl drops them); MLflow's history keeps both values
at such a step (the newer one is the run's latest value); W&B keeps the first (a W&B run's steps only increase),
and a resume is deterministic, so both are the same numbers unless --resume-with-new-config changed the config.
A resumed MLflow run cannot change a param: a changed value is recorded as a `config_change.<key>` tag.

A tracker that fails during a run is a warning and is left out for the rest of it: metrics.jsonl stays the record.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from raycap.config import dotted_fields
from raycap.errors import UserError

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> (its package, the raycap extra that installs it)
STATE_FILE = "trackers.json"  # the tracker runs' ids, for a resumed run
PARAM_CHARS = 500  # an MLflow param value's length here (MLflow allows 6000, older servers 500)
REPORT_DIR = "report"


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- what is logged ------------------------------------------------------------------------------------------


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as tracker scalars: `train/<field>` for the record's own fields and
    `eval/<field>` for those of its validation evaluation (`step` is the x axis, not a scalar)."""
    out = {}
    for prefix, fields in (("train", record), ("eval", record.get("eval") or {})):
        for k, v in fields.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}/{k}"] = float(v)
    return out


def params(config) -> dict[str, str]:
    """The run config as MLflow params: dotted keys (`rl.optimiser.lr`), values as JSON (strings as they are), each
    cut to PARAM_CHARS characters."""
    out = {}
    for k, v in dotted_fields(config.model_dump(mode="json"), keep_empty=True).items():
        text = v if isinstance(v, str) else json.dumps(v)
        out[k] = text if len(text) <= PARAM_CHARS else text[:PARAM_CHARS - 3] + "..."
    return out


# -- startup checks --------------------------------------------------------------------------------------------


def check_loggers(runtime) -> None:
    """Before anything loads: each enabled tracker's package is installed (else one line naming the extra to
    install), and MLflow can open its tracking URI."""
    for name in runtime.loggers:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            raise UserError(f"runtime.loggers: {name!r} needs the {name} package: pip install 'raycap[{EXTRAS[name]}]'")
    if "mlflow" in runtime.loggers:
        _mlflow_client(runtime.mlflow_tracking_uri)


def _is_file_store(uri: str) -> bool:
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a path (C:\\ on Windows) or a file: URI


def _mlflow_client(uri: str | None):
    """An MlflowClient of `uri` (None: MLFLOW_TRACKING_URI, else MLflow's default) and the URI it resolved; a
    store MLflow cannot open is a one-line UserError. A file store (file:./mlruns), which MLflow 3 refuses unless
    MLFLOW_ALLOW_FILE_STORE=true, is allowed when the config or the environment names one (unless that
    variable is set otherwise)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    named = uri or os.environ.get("MLFLOW_TRACKING_URI")
    resolved = named or mlflow.get_tracking_uri()
    field = ("runtime.mlflow_tracking_uri" if uri else "MLFLOW_TRACKING_URI" if named
             else "runtime.mlflow_tracking_uri (unset: MLflow's default)")
    if named and _is_file_store(resolved):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    database = resolved.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")
    if database and importlib.util.find_spec("sqlalchemy") is None:
        raise UserError(f"{field} {resolved!r}: a database store needs the full mlflow package (pip install mlflow); "
                        "with mlflow-skinny set runtime.mlflow_tracking_uri to a server (http://host:5000) or a "
                        "file store (file:./mlruns)")
    try:
        return MlflowClient(resolved), resolved
    except Exception as e:  # noqa: BLE001 — whatever the store says, in one line
        raise UserError(f"{field} {resolved!r}: MLflow cannot open it ({_line(e)})") from None


# -- the backends --------------------------------------------------------------------------------------------


class _TensorBoard:
    def __init__(self, out: Path, config, state: dict | None, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
        self.state = None

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def artifact(self, directory: Path, name: str) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config, state: dict | None, step: int):
        import wandb

        self.wandb = wandb
        run_id = (state or {}).get("id")
        try:
            self.run = wandb.init(project=config.runtime.tracker_project, name=out.name, id=run_id,
                                  resume="allow" if run_id else None, config=config.model_dump(mode="json"),
                                  allow_val_change=True,
                                  dir=None if os.environ.get("WANDB_DIR") else str(out))
        except Exception as e:  # noqa: BLE001 — no key, no network, a bad project: one line
            raise UserError(f"runtime.loggers: wandb could not start its run ({_line(e)}); its key comes from "
                            "WANDB_API_KEY (or `wandb login`); WANDB_MODE=offline logs without an account") from None
        self.floor = self.run.starting_step if run_id else 0  # a resumed W&B run drops steps below this one
        self.state = {"id": self.run.id, "project": config.runtime.tracker_project}

    def log(self, values: dict, step: int) -> None:
        if step >= self.floor:
            self.run.log(values, step=step)

    def artifact(self, directory: Path, name: str) -> None:
        art = self.wandb.Artifact(f"{name}-{self.run.id}", type=name)
        art.add_dir(str(directory))
        self.run.log_artifact(art)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, out: Path, config, state: dict | None, step: int):
        self.client, uri = _mlflow_client(config.runtime.mlflow_tracking_uri)
        state = state or {}
        run = None
        if state.get("run_id") and state.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(state["run_id"])
                self.client.update_run(run.info.run_id, status="RUNNING")
            except Exception as e:  # noqa: BLE001 — deleted, or another store: a new run
                _warn(f"MLflow run {state['run_id']} cannot be resumed ({_line(e)}); logging to a new run")
                run = None
        if run is None:
            run = self.client.create_run(self._experiment(config.runtime.tracker_project), run_name=out.name,
                                         tags={"raycap.run_dir": str(out.resolve())})
        self.run_id = run.info.run_id
        self.state = {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": run.info.experiment_id}
        self._log_params(run.data.params, params(config))

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 — another run (a trial of a search) created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, logged: dict, wanted: dict) -> None:
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in wanted.items() if k not in logged]
        changed = [RunTag(f"config_change.{k}", f"{logged[k]} -> {v}"[:5000]) for k, v in wanted.items()
                   if k in logged and logged[k] != v]  # a param cannot change; the tag says it did
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])

    def log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def artifact(self, directory: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=name)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def read_state(out: Path) -> dict:
    try:
        state = json.loads((Path(out) / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


class Trackers:
    """The enabled trackers of one run dir (`loggers`, by default the config's), opened together at `step`; a
    resumed run (by default step > 0) logs to the tracker runs recorded in RUN/trackers.json, a fresh one starts
    new ones."""

    def __init__(self, out: Path, config=None, step: int = 0, loggers=None, resume: bool | None = None):
        self.out = Path(out)
        if loggers is None:
            loggers = config.runtime.loggers if config is not None else ["tensorboard"]
        state = read_state(self.out) if (step > 0 if resume is None else resume) else {}
        self.backends = {}
        try:
            for name in loggers:
                self.backends[name] = BACKENDS[name](self.out, config, state.get(name), step)
        except BaseException:
            self.close(failed=True)
            raise
        kept = {name: b.state for name, b in self.backends.items() if b.state}
        if kept:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / STATE_FILE).write_text(json.dumps(read_state(self.out) | kept, indent=2) + "\n")

    def _each(self, what: str, call) -> None:
        for name, backend in list(self.backends.items()):
            try:
                call(backend)
            except Exception as e:  # noqa: BLE001 — the run goes on; metrics.jsonl stays the record
                _warn(f"{name} failed to {what} ({_line(e)}); it is left out for the rest of this run")
                del self.backends[name]

    def log(self, record: dict) -> None:
        """A metrics.jsonl record's scalars, at its step, to every tracker."""
        values, step = scalars(record), record["step"]
        self._each("log", lambda b: b.log(values, step))

    def artifact(self, directory: Path, name: str) -> None:
        self._each(f"log {directory}", lambda b: b.artifact(directory, name))

    def close(self, failed: bool = False) -> None:
        """Finish each tracker's run (failed: marked so, where the tracker has such a state)."""
        for name, backend in list(self.backends.items()):
            try:
                backend.close(failed)
            except Exception as e:  # noqa: BLE001
                _warn(f"{name} failed to close ({_line(e)})")
        self.backends = {}


def log_report_artifact(run_dir: Path, config) -> None:
    """Log RUN/report/ (once written) to the W&B and MLflow runs of the run dir, reopened from RUN/trackers.json.
    The run is complete, so a failure here is a warning."""
    run_dir = Path(run_dir)
    report = run_dir / REPORT_DIR
    names = [n for n in config.runtime.loggers if n in EXTRAS]
    if not names or not (report / "index.html").is_file():
        return
    state = read_state(run_dir)
    missing = [n for n in names if n not in state]
    if missing:
        _warn(f"{run_dir / STATE_FILE} names no {' or '.join(missing)} run; the report is not logged there")
    names = [n for n in names if n in state]
    if not names:
        return
    try:
        trackers = Trackers(run_dir, config, loggers=names, resume=True)
    except Exception as e:  # noqa: BLE001
        _warn(f"the report was not logged to {', '.join(names)} ({_line(e)}); it is in {report}")
        return
    try:
        trackers.artifact(report, REPORT_DIR)
    finally:
        trackers.close()
