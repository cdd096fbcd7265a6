"""What `raycap train` prints, read as the user reads it: a Ray run's whole output (no Ray error line, how to open
the dashboard and its metrics, the TensorBoard command, the test table last, no raw JSON dump), and Ctrl-C (one
line saying where the run stopped and how to resume it, exit 130, no traceback)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from world_runs import SHORT, world_args

RAYCAP = str(Path(sys.executable).parent / "raycap")


def test_a_ray_run_prints_no_ray_error_and_ends_with_the_test_table(printed_ray_run):
    out, done = printed_ray_run
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    # the reward service's splits are no creation-task dependency: Ray's error line for that is gone
    assert "constructor arguments in the object store" not in printed, printed
    assert not [line for line in printed.splitlines() if " ERROR " in line or line.startswith("ERROR")], printed
    lines = done.stdout.splitlines()
    dashboard = next(i for i, line in enumerate(lines) if line.startswith("Ray dashboard: http://127.0.0.1:"))
    assert "`ray get-auth-token`" in lines[dashboard]
    assert "`ray metrics launch-prometheus`" in lines[dashboard + 1]
    assert f"curves: tensorboard --logdir {out / 'tensorboard'}" in lines
    # the end: one line of test metrics naming the JSON, the test table, the report, the run dir; no JSON dump
    assert '"p_at_1":' not in done.stdout
    final = json.loads((out / "final_metrics.json").read_text())
    test_line = next(i for i, line in enumerate(lines) if line.startswith("test (100 images): P@1 "))
    assert f"P@1 {final['p_at_1']:.3f}" in lines[test_line] and str(out / "final_metrics.json") in lines[test_line]
    assert lines[-2] == f"report: {out / 'report' / 'index.html'}  (open it in a browser)", lines[-3:]
    table = lines[test_line + 1:-2]
    assert table[0].startswith("test, the first 100 images") and any("fine-tuned" in row for row in table), table
    assert lines[-1].startswith(f"run dir: {out}")


def test_ctrl_c_prints_where_the_run_stopped_and_how_to_resume_it(tiny_world_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", "world-demo", "--out", str(out), "--runtime", "local",
            *world_args(tiny_world_dir), *SHORT, "--set", "rl.steps=100000", "--set", "checkpoint_every=2",
            "--set", "eval.every=100000"]
    proc = subprocess.Popen([RAYCAP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints" / "step-4" / "trainer_state.pt").exists():
            time.sleep(0.5)
        assert (out / "checkpoints" / "step-4" / "trainer_state.pt").exists(), proc.stderr.read()[-2000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoints = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                   if (p / "trainer_state.pt").is_file()]
    head, command = last.split("; resume with: ")
    assert head == f"stopped at step {max(steps)} (Ctrl-C); last checkpoint at step {max(checkpoints)}", last
    assert max(checkpoints) >= 4 and shlex.split(command) == ["raycap", *argv]
