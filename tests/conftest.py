import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

TINY = ["--set", "version=1", "--set", "n_train=400", "--set", "n_val=120", "--set", "n_test=120", "--set", "labelled_fraction=0.05",
        "--retriever-steps", "4", "--retriever-batch", "32", "--captioner-epochs", "1", "--threads", "2"]


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory):
    """A pretrained world built by `python -m raycap.pretrain` on a tiny world (seconds, untrained models)."""
    from raycap.pretrain import main

    out = tmp_path_factory.mktemp("pretrain") / "world"
    main(["world", "--out", str(out), *TINY])
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def printed_ray_run(tmp_path_factory):
    """`raycap train` on Ray as a user runs it (the console command, in a process of its own): 4 updates on the
    shipped world (200 train images) that end with the test table and the report. (run dir, what it printed)."""
    import subprocess
    import sys
    from pathlib import Path

    from world_runs import SHORT

    out = tmp_path_factory.mktemp("printed") / "run"
    args = [str(Path(sys.executable).parent / "raycap"), "train", "--config", "world-demo", "--out", str(out), *SHORT,
            "--set", "data.train_images=200", "--set", "rl.steps=4", "--set", "eval.every=2",
            "--set", "eval.report_gallery=6", "--set", "runtime.num_cpus=4",
            "--set", f"runtime.dashboard_port={free_port()}"]  # a Ray another test left running may hold 8265
    env = dict(os.environ, RAYCAP_CACHE=str(tmp_path_factory.getbasetemp() / "cache"))
    return out, subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Training and evaluation refused: a test using it shows its input was checked before any work began."""
    import raycap.evaluate
    import raycap.train

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was checked")
    for mod, name in ((raycap.train, "run_local"), (raycap.train, "run_ray"), (raycap.evaluate, "evaluate_dataset")):
        monkeypatch.setattr(mod, name, boom)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAYCAP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
