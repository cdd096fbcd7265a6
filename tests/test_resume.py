"""Runs that lose or mix state (issue 15): a resume checks the run dir's config and runtime, a resumed run equals
an uninterrupted one (both runtimes), learner checkpoints reach the run dir through the controller (no shared
disk between head and workers), the embedding cache survives two builders at once, and each actor's threads
follow its CPU share."""
import json
import multiprocessing as mp
import os
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file

from world_runs import records, run, world_args, world_sets

KEYS = ("reward_mean", "kl", "loss", "train_p_at_1")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """Local Ray whose workers start in their own dir and keep temp files in their own scratch: relative run
    dirs and checkpoints only work if the controller alone touches the run dir, as on a cluster whose workers
    do not share the head's disk."""
    base = tmp_path_factory.mktemp("ray")
    (base / "worker_cwd").mkdir()
    env = {"RAYCAP_CACHE": str(tmp_path_factory.getbasetemp() / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAYCAP_SCRATCH": str(base / "scratch")}
    cwd = os.getcwd()
    os.chdir(base / "worker_cwd")  # local Ray's workers inherit the cwd of the process that starts it
    try:
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    finally:
        os.chdir(cwd)
    yield base
    ray.shutdown()


def weights(final):
    return {f"{p.relative_to(final)}:{k}": v for p in sorted(final.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def refused(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(*args[:2], *args[2:-1], runtime=args[-1])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- 1. resume checks the config and the runtime -------------------------------------------------------------
def test_resume_refuses_a_changed_config_a_switched_runtime_and_fewer_steps(tiny_world_dir, tmp_path, capsys):
    out, ckpt = tmp_path / "run", ("--set", "checkpoint_every=2")
    run(tiny_world_dir, out, *ckpt, "--set", "rl.steps=2", runtime="local")
    config, log = (out / "config.json").read_text(), (out / "metrics.jsonl").read_text()
    assert json.loads((out / "run.json").read_text()) == {"runtime": "local"}

    err = refused(capsys, tiny_world_dir, out, *ckpt, "--set", "rl.steps=2", "--set", "rl.optimiser.lr=0.001",
                  "--set", "rl.optimiser.train_lm=false", "local")
    assert "different config (rl.optimiser.lr: 0.0003 -> 0.001, rl.optimiser.train_lm: True -> False)" in err
    assert "--resume-with-new-config" in err
    err = refused(capsys, tiny_world_dir, out, *ckpt, "--set", "rl.steps=2", "ray")  # fails before Ray starts
    assert "made by the local runtime" in err and "--runtime ray cannot resume it" in err
    err = refused(capsys, tiny_world_dir, out, *ckpt, "--set", "rl.steps=1", "--resume-with-new-config", "local")
    assert "rl.steps=1 but its checkpoint step-2 already holds 2 updates" in err
    # nothing was written by a refused run
    assert (out / "config.json").read_text() == config and (out / "metrics.jsonl").read_text() == log
    assert not (out / "config_changes.jsonl").exists()

    final = run(tiny_world_dir, out, *ckpt, "--set", "rl.steps=3", "--set", "rl.optimiser.lr=0.001",
                "--resume-with-new-config",
                runtime="local")
    assert final["updates"] == 1 and "at step 2" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["rl"]["optimiser"]["lr"] == 0.001
    change = json.loads((out / "config_changes.jsonl").read_text())
    assert change["changes"] == {"rl.optimiser.lr": [0.0003, 0.001], "rl.steps": [2, 3]}
    assert change["runtime"] == "local"
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3]


# -- 2. a resumed run equals an uninterrupted one ------------------------------------------------------------
def interrupt(src, dst):
    """`dst`: `src` as if killed after step 3 (checkpoint step-2 kept; step 3's log line and beyond are there)."""
    shutil.copytree(src, dst)
    for name in ("checkpoints/step-4", "final"):
        shutil.rmtree(dst / name)
    (dst / "final_metrics.json").unlink()
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # steps 0-3 logged, not 4


LORA = ("--set", "captioner.lora.r=4", "--set", "captioner.lora.alpha=8")


@pytest.mark.parametrize("runtime,adapters", [
    ("local", False),
    # slow: ray-lora resumes through the same Controller/Learner checkpoint path (plus its adapters)
    pytest.param("ray", False, marks=pytest.mark.slow), ("ray", True)], ids=["local", "ray", "ray-lora"])
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_world_dir, tmp_path, capsys, runtime, adapters, request):
    if runtime == "ray":
        request.getfixturevalue("ray_session")
    args = ("--set", "rl.steps=4", "--set", "checkpoint_every=2", *(LORA if adapters else ()))
    whole = run(tiny_world_dir, tmp_path / "whole", *args, runtime=runtime)
    interrupt(tmp_path / "whole", tmp_path / "resumed")
    capsys.readouterr()
    resumed = run(tiny_world_dir, tmp_path / "resumed", *args, runtime=runtime)
    assert "step-2 at step 2" in capsys.readouterr().out and resumed["updates"] == 2
    a, b = records(tmp_path / "whole"), records(tmp_path / "resumed")
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for key in KEYS:
        assert [r[key] for r in a[3:]] == [r[key] for r in b[3:]], key
    assert a[-1]["example"] == b[-1]["example"] and a[-1]["eval"]["p_at_1"] == b[-1]["eval"]["p_at_1"]
    assert whole["p_at_1"] == resumed["p_at_1"]
    assert_same_weights(tmp_path / "whole" / "final", tmp_path / "resumed" / "final")
    if adapters:  # LoRA trained the LM through its adapters, and the run's captioners are plain, merged ones
        start, final = weights(tiny_world_dir / "captioner"), weights(tmp_path / "whole" / "final")
        assert start.keys() == final.keys()
        lm = [k for k in start if k.startswith("lm/")]
        assert lm and any(not torch.equal(start[k], final[k]) for k in lm)
    # the other runtime neither resumes nor truncates this run dir
    other = "local" if runtime == "ray" else "ray"
    log = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert f"made by the {runtime} runtime" in refused(capsys, tiny_world_dir, tmp_path / "resumed", *args, other)
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == log


# -- 3. checkpoints with no disk shared between the controller and the learner ranks ------------------------
def test_learner_checkpoints_reach_the_run_dir_through_the_controller(tiny_world_dir, tmp_path, ray_session,
                                                                      monkeypatch, capsys):
    @ray.remote(num_cpus=0)
    def cwd():
        return os.getcwd()

    worker_cwd = ray_session / "worker_cwd"
    assert ray.get(cwd.remote()) == str(worker_cwd)  # workers see another dir than the controller's
    (tmp_path / "head").mkdir()
    monkeypatch.chdir(tmp_path / "head")
    args = ("--set", "rl.steps=2", "--set", "checkpoint_every=1", "--set", "runtime.learner_workers=2",
            "--set", "runtime.zero_stage=2")
    run(tiny_world_dir, "run", *args)  # a relative run dir: only the controller can resolve it
    step = tmp_path / "head" / "run" / "checkpoints" / "step-1"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "captioner/raycap_clipcap.json",
                 "captioner/tokenizer/tokenizer.json", "controller.pt"):
        assert (step / name).is_file(), name
    assert (tmp_path / "head" / "run" / "final" / "raycap_clipcap.json").is_file()
    assert list(worker_cwd.iterdir()) == []  # the learners wrote nothing where they run ...
    scratch = ray_session / "scratch"
    assert scratch.is_dir() and list(scratch.iterdir()) == []  # ... and cleaned their scratch

    # a fresh head dir holding only RUN, every rank's scratch gone: the run resumes from RUN alone
    (tmp_path / "head2").mkdir()
    shutil.copytree(tmp_path / "head" / "run", tmp_path / "head2" / "run")
    shutil.rmtree(tmp_path / "head2" / "run" / "checkpoints" / "step-2")
    shutil.rmtree(scratch)
    monkeypatch.chdir(tmp_path / "head2")
    capsys.readouterr()
    final = run(tiny_world_dir, "run", *args)
    assert "step-1 at step 1" in capsys.readouterr().out and final["updates"] == 1
    a, b = records(tmp_path / "head" / "run"), records(tmp_path / "head2" / "run")
    for key in KEYS:  # ZeRO-2: each rank got its own optimizer shard back
        assert a[-1][key] == pytest.approx(b[-1][key], rel=1e-6, abs=1e-7), key
    assert_same_weights(tmp_path / "head" / "run" / "final", tmp_path / "head2" / "run" / "final")


# -- 4. two processes building one embedding cache at once ---------------------------------------------------
def _build_cache(world_dir, cache, barrier, sizes, results):
    os.environ["RAYCAP_CACHE"] = cache
    torch.set_num_threads(1)
    import raycap.data.cache as cache_module
    from raycap.models.loading import load_world_dir

    write = cache_module.save_file

    def write_together(tensors, filename):  # the worst interleaving: both write, then both rename
        barrier.wait(timeout=120)
        write(tensors, filename)
        barrier.wait(timeout=120)

    cache_module.save_file = write_together
    pw = load_world_dir(world_dir)
    try:
        for n in sizes:
            barrier.wait(timeout=120)
            cache_module.world_image_embeddings(pw.retriever, pw.world, "train", n)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 — reported to the test
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")


def test_two_processes_build_one_embedding_cache_at_once(tiny_world_dir, tmp_path):
    from raycap.data.cache import world_image_embeddings
    from raycap.models.loading import load_world_dir

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    sizes = [400, 399, 398]  # three caches, each built by both processes at the same moment
    procs = [ctx.Process(target=_build_cache, args=(str(tiny_world_dir), str(tmp_path), barrier, sizes, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok", "ok"]
    entries = sorted((tmp_path / "embeddings").iterdir())  # one complete entry per size, no temp dir left
    assert len(entries) == len(sizes) and all((e / "manifest.json").is_file() for e in entries), entries
    pw = load_world_dir(tiny_world_dir)
    os.environ["RAYCAP_CACHE"] = str(tmp_path)  # the autouse fixture restores it
    for n in sizes:
        expected = world_image_embeddings(pw.retriever, pw.world, "train", n, use_cache=False)
        assert torch.equal(world_image_embeddings(pw.retriever, pw.world, "train", n), expected), n


# -- 5. each actor's threads follow its CPU share -----------------------------------------------------------
def test_actor_threads_follow_their_cpu_share(tiny_world_dir, tmp_path, ray_session):
    from raycap.config import load_config
    from raycap.runtime.controller import Controller
    from raycap.runtime.resources import actor_threads

    assert [actor_threads(c) for c in (0.25, 0.5, 1, 1.5, 2)] == [1, 1, 1, 2, 2]
    assert actor_threads(0.5, 3) == 3

    def report(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: (torch.get_num_threads(),
                                                               os.environ["OMP_NUM_THREADS"])))

    base = [*world_sets(tiny_world_dir), "eval.images=100", "rl.sampling.max_new_tokens=8", "rl.batch_size=24",
            "rl.reward.num_candidates=24", "runtime.cpus_per_learner=1.5", "runtime.cpus_per_rollout=1",
            "threads=null"]  # world-demo sets threads: 2
    for overrides, want in [([], {"learner": 2, "rollout": 1, "reward": 1}),
                            (["threads=3"], {"learner": 3, "rollout": 3, "reward": 3})]:
        c = Controller(load_config("world-demo", base + overrides), tmp_path / f"run{len(overrides)}")
        try:
            got = {"learner": report(c.learners[0]), "rollout": report(c.rollouts[0]), "reward": report(c.reward)}
        finally:
            c.shutdown()
        assert got == {k: (n, str(n)) for k, n in want.items()}, overrides
