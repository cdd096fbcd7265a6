"""Read a run dir and write its report: `build_report(run_dir)` -> RUN/report/index.html."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from raycap.errors import UserError, format_validation_error
from raycap.runlog import RUN_FILE, read_records


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def run_config(run_dir: Path):
    from raycap.config import RunConfig

    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.json, so not a run dir of python -m raycap.train")
    try:
        return RunConfig.model_validate(read_json(path))
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None


def run_facts(cfg, records: list[dict], final: dict | None, runtime: str | None) -> list[str]:
    rl = cfg.rl
    data = cfg.data.kind + (f" ({cfg.data.path})" if cfg.data.path else " (the shipped world)" if
                            cfg.data.kind == "world" else "")
    facts = [f"{rl.method}: reward {rl.reward.kind}, baseline {rl.algorithm.baseline}, "
             f"kl_coef {rl.algorithm.kl_coef}, lr {rl.optimiser.lr}, "
             f"batch {rl.batch_size}, seed {cfg.seed}" if rl.method == "discritune" else
             f"{rl.method}: lr {rl.optimiser.lr}, batch {rl.batch_size}, seed {cfg.seed}",
             f"data: {data}; runtime: {runtime or 'unknown'}"]
    done = max((r["step"] for r in records), default=0)
    if final is not None:
        facts.append(f"{final.get('updates', done)} updates in {final.get('rl_seconds', '?')} s of RL"
                     + (f"; actor restarts: {final['actor_restarts']}" if final.get("actor_restarts") else ""))
    else:
        facts.append(f"in progress or stopped: {done} of {rl.steps} updates logged")
    return facts


def build_report(run_dir: str | Path, out: str | Path | None = None, gallery: int = 24, log=print,
                 comparison=None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report) and return the path of its index.html.

    A run without a final captioner (still running, or stopped) gets its learning curves only. `comparison`: the
    test comparison of final/ (`gallery.compare_on_test` into `out`) when the caller has computed it already."""
    from raycap.report import page, plots

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    cfg = run_config(run_dir)
    records = read_records(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    final = read_json(run_dir / "final_metrics.json") if (run_dir / "final_metrics.json").is_file() else None
    runtime = read_json(run_dir / RUN_FILE).get("runtime") if (run_dir / RUN_FILE).is_file() else None
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = plots.learning_curves(records, out)
    notes = []
    if final is not None and (run_dir / "final").is_dir():
        from raycap.report.gallery import compare_on_test

        if comparison is None:
            comparison = compare_on_test(cfg, run_dir / "final", out, gallery, log)
        recorded = final.get("p_at_1")
        if isinstance(recorded, float) and abs(recorded - comparison.after.get("p_at_1", recorded)) > 1e-9:
            notes.append(f"final_metrics.json records test P@1 {recorded:.3f}; the fine-tuned captioner of final/ "
                         f"gives {comparison.after['p_at_1']:.3f} here (another machine or thread count).")
    else:
        comparison = None
        notes.append("No final captioner yet (final/ and final_metrics.json appear when the run ends): only the "
                     "learning curves so far are shown.")
    html = page.render(f"raycap run: {run_dir.resolve().name}", run_facts(cfg, records, final, runtime), comparison,
                       curves, cfg.model_dump(mode="json"), notes)
    index = out / "index.html"
    index.write_text(html)
    return index
