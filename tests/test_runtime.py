"""The Ray runtime on local Ray (num_cpus=2) and the tiny world: same updates as the reference loop, weight
versions, colocated == object_store, a killed rollout worker, resume, Gumbel on the learner, bad resources."""
import os
import signal

import pytest
import ray

from raycap.config import load_config
from raycap.errors import UserError
from world_runs import records, run, world_args, world_sets


@pytest.fixture(scope="module", autouse=True)
def ray_session(tmp_path_factory):
    env = {"RAYCAP_CACHE": str(tmp_path_factory.getbasetemp() / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()


def config(world, *overrides):
    return load_config("world-demo", [*world_sets(world), "eval.images=100", "rl.sampling.max_new_tokens=8",
                                      "threads=1",
                                      "rl.batch_size=24", "rl.reward.num_candidates=24", *overrides])


def test_ray_runtime_matches_the_reference_loop(tiny_world_dir, tmp_path):
    """The same updates on both runtimes, the verify-then-imitate gate included (its verdicts travel from the
    reward service to the controller's advantages)."""
    gate = ("--set", "rl.self_check.gate=true")
    ray_run = run(tiny_world_dir, tmp_path / "ray", "--set", "rl.steps=3", *gate)
    local = run(tiny_world_dir, tmp_path / "local", "--set", "rl.steps=3", "--set", "rl.optimiser.micro_batch=8",
                *gate, runtime="local")  # micro-batches of 8 images accumulate the whole batch's gradient
    a, b = records(tmp_path / "ray"), records(tmp_path / "local")
    for key in ("reward_mean", "kl", "loss", "train_p_at_1", "verified"):
        assert [r[key] for r in a[1:]] == pytest.approx([r[key] for r in b[1:]], rel=1e-4, abs=1e-5), key
    assert ray_run["p_at_1"] == pytest.approx(local["p_at_1"], abs=0.011)
    assert [r["policy_lag"] for r in a[1:]] == [0, 0, 0]
    # the safeguards: on-policy in fp32 the decoder's token log-probs are the learner's, and every sync (object
    # store: loaded before the next step's rollouts; the reference loop: its optimizer step) changed the weights
    assert all(r["logprob_drift"] < 1e-4 and r["logprob_drift_max"] < 1e-4 for r in a[1:] + b[1:])
    assert [r.get("sync_changed") for r in a[1:]] == [None, 1.0, 1.0]
    assert [r["sync_changed"] for r in b[1:]] == [1.0, 1.0, 1.0]
    assert (tmp_path / "ray" / "final" / "raycap_clipcap.json").is_file()


def test_two_rollout_workers_use_the_newest_weights(tiny_world_dir, tmp_path):
    from raycap.runtime.controller import Controller

    c = Controller(config(tiny_world_dir, "runtime.rollout_workers=2", "rl.steps=3"), tmp_path)
    try:
        for step in range(3):
            record, _ = c.run_step(step, None)
            assert record["policy_lag"] == 0 and c.version == step + 1
        img = ray.get(c.reward.batch.remote(3))[1][:2]
        versions = ray.get([w.rollout.remote(3, img, c.version, c.weights) for w in c.rollouts])
        assert [v["version"] for v in versions] == [3, 3]
    finally:
        c.shutdown()


def test_colocated_gives_the_same_updates_as_object_store(tiny_world_dir, tmp_path):
    run(tiny_world_dir, tmp_path / "store", "--set", "rl.steps=3")
    run(tiny_world_dir, tmp_path / "colo", "--set", "rl.steps=3", "--set", "runtime.weight_sync=colocated")
    a, b = records(tmp_path / "store"), records(tmp_path / "colo")
    assert [r["reward_mean"] for r in a[1:]] == pytest.approx([r["reward_mean"] for r in b[1:]], rel=1e-5)
    assert all(r["weight_sync_seconds"] == 0 for r in b[1:])
    assert all(r["sync_changed"] == 1.0 for r in b[1:])  # colocated: the learner's step changed its decoder


def test_two_deepspeed_learner_ranks_with_zero2_match_one(tiny_world_dir, tmp_path):
    run(tiny_world_dir, tmp_path / "one", "--set", "rl.steps=3")
    run(tiny_world_dir, tmp_path / "two", "--set", "rl.steps=3", "--set", "runtime.learner_workers=2",
        "--set", "runtime.zero_stage=2", "--set", "rl.optimiser.micro_batch=4")  # 3 DeepSpeed micro-steps per rank
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("reward_mean", "kl"):
        assert [r[key] for r in a[1:]] == pytest.approx([r[key] for r in b[1:]], rel=1e-3, abs=1e-4), key


def test_policy_lag_one_overlaps_rollouts_with_the_update(tiny_world_dir, tmp_path):
    run(tiny_world_dir, tmp_path, "--set", "rl.steps=3", "--set", "runtime.max_policy_lag=1")
    log = records(tmp_path)[1:]
    assert [r["policy_lag"] for r in log] == [0, 1, 1]
    # lagged rollouts are importance-weighted; the ratio pi/mu of a policy one update newer is logged
    assert "importance_ratio_mean" not in log[0]
    for r in log[1:]:
        assert 0 < r["importance_ratio_mean"] and r["importance_ratio_max"] >= r["importance_ratio_mean"]
        assert r["importance_ratio_mean"] != 1.0  # the learner moved, so pi != mu
    # the drift between the decoder's and the learner's log-probs is ~0 on-policy, the update's size one version on
    assert log[0]["logprob_drift"] < 1e-4 < min(r["logprob_drift"] for r in log[1:])


@pytest.mark.slow  # the rejoin test below checks the broadcast to the group formed at start, then after a restart
def test_broadcast_weight_sync_over_gloo(tiny_world_dir, tmp_path):
    from raycap.runtime.controller import Controller

    c = Controller(config(tiny_world_dir, "runtime.weight_sync=nccl", "runtime.collective_backend=gloo",
                          "runtime.rollout_workers=2", "rl.steps=2"), tmp_path)
    try:
        for step in range(2):
            c.run_step(step, None)
        learner = ray.get(c.learners[0].publish.remote())
        for w in c.rollouts:
            assert (ray.get(w.weights.remote()) == learner).all()
        img = ray.get(c.reward.batch.remote(2))[1][:2]
        assert ray.get(c.rollouts[1].rollout.remote(2, img, c.version, None))["version"] == 2
    finally:
        c.shutdown()


def test_a_killed_rollout_worker_is_restarted_and_the_run_completes(tiny_world_dir, tmp_path):
    from raycap.runtime.controller import Controller

    c = Controller(config(tiny_world_dir, "runtime.rollout_workers=2", "rl.steps=4"), tmp_path)
    try:
        c.run_step(0, None)
        os.kill(ray.get(c.rollouts[0].pid.remote()), signal.SIGKILL)
        for step in range(1, 4):
            record, _ = c.run_step(step, None)
        assert c.restarts == 1 and record["actor_restarts"] == 1 and c.version == 4
    finally:
        c.shutdown()


def test_a_killed_rollout_worker_rejoins_the_weight_broadcast(tiny_world_dir, tmp_path):
    """weight_sync nccl (over gloo here): a rollout worker that Ray restarts is in no broadcast group, so the
    controller re-forms the group before the next rollouts; the worker gets the current weights from that broadcast
    (its captions are the current version's) and the run goes on."""
    import torch

    from raycap.runtime.controller import Controller

    c = Controller(config(tiny_world_dir, "runtime.weight_sync=nccl", "runtime.collective_backend=gloo",
                          "runtime.rollout_workers=2", "rl.steps=2"), tmp_path)
    try:
        c.run_step(0, None)
        learner = ray.get(c.learners[0].publish.remote())
        for w in c.rollouts:  # the group formed at start: every worker holds the learner's weights
            assert (ray.get(w.weights.remote()) == learner).all()
        os.kill(ray.get(c.rollouts[0].pid.remote()), signal.SIGKILL)
        record, _ = c.run_step(1, None)
        assert c.restarts == 1 and record["policy_lag"] == 0 and record["sync_changed"] == 1.0
        learner = ray.get(c.learners[0].publish.remote())
        for w in c.rollouts:
            assert (ray.get(w.weights.remote()) == learner).all()
        img = ray.get(c.reward.batch.remote(2))[1][:3]
        restarted, kept = ray.get([w.rollout.remote(2, img, c.version, None, True) for w in c.rollouts])
        assert restarted["version"] == kept["version"] == 2 and torch.equal(restarted["tokens"], kept["tokens"])
        # a worker restarted while its rollout was queued or running: the retried task finds no weights, and the
        # controller rejoins it to the broadcast and decodes that shard again
        os.kill(ray.get(c.rollouts[1].pid.remote()), signal.SIGKILL)
        catch_up, c._catch_up = c._catch_up, lambda: None  # as if it died after the submission's check
        refs = c.submit_rollouts(2, ray.get(c.reward.batch.remote(2))[1])
        c._catch_up = catch_up
        tokens, _, _, info = c.collect(refs)
        assert info["rollout_version"] == 2 and c.restarts == 2 and len(tokens) == c.cfg.rl.batch_size * \
            c.cfg.rl.sampling.num_samples
    finally:
        c.shutdown()


def test_sync_changed_reads_0_when_a_weight_sync_moves_nothing(tiny_world_dir, monkeypatch):
    """The safeguard against a sync that silently leaves the decoder's weights as they were: a rollout worker (in
    this process, no actor) reports whether loading the learner's weights changed its own; both are dashboard
    gauges."""
    import torch

    from raycap.runtime import rollout
    from raycap.runtime.metrics import GAUGES

    assert {"logprob_drift", "sync_changed"} <= set(GAUGES)
    threads = torch.get_num_threads()
    try:
        worker = rollout.RolloutWorker(config(tiny_world_dir).model_dump_json(), 0)
    finally:
        torch.set_num_threads(threads)  # the worker sets this process's threads to the config's
    img = torch.randn(2, worker.policy.config.clip_dim)
    flat = worker.weights()
    assert worker.rollout(0, img, 1, [ray.put(flat + 1e-3)])["sync_changed"] is True
    monkeypatch.setattr(rollout, "load_flat_weights", lambda model, weights: None)
    assert worker.rollout(0, img, 2, [ray.put(flat)])["sync_changed"] is False


def test_resume_continues_the_step_counter_and_metrics(tiny_world_dir, tmp_path, capsys):
    import shutil

    run(tiny_world_dir, tmp_path, "--set", "rl.steps=3", "--set", "checkpoint_every=2")
    shutil.rmtree(tmp_path / "checkpoints" / "step-3")  # as if killed after step 3 was logged, before its checkpoint
    final = run(tiny_world_dir, tmp_path, "--set", "rl.steps=4", "--set", "checkpoint_every=2")
    assert "step-2 at step 2" in capsys.readouterr().out and final["updates"] == 2
    assert [r["step"] for r in records(tmp_path)] == [0, 1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step-4" / "controller.pt").is_file()


def test_gumbel_on_ray_equals_gumbel_in_the_reference_loop(tiny_world_dir, tmp_path):
    gumbel = ["--set", "rl.method=gumbel", "--set", "rl.self_check.gate=false"]
    final = run(tiny_world_dir, tmp_path / "ray", "--set", "rl.steps=3", *gumbel)
    run(tiny_world_dir, tmp_path / "local", "--set", "rl.steps=3", *gumbel, runtime="local")
    assert final["updates"] == 3
    a, b = records(tmp_path / "ray"), records(tmp_path / "local")
    for key in ("clip_cos", "task_loss", "kl", "loss"):
        assert [r[key] for r in a[1:]] == pytest.approx([r[key] for r in b[1:]], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("override, needle", [
    ("runtime.gpus_per_learner=1", "need 1 GPU"),
    ("runtime.cpus_per_rollout=8", "need 8.75 CPU"),
])
def test_resources_beyond_the_cluster_fail_fast(tiny_world_dir, tmp_path, override, needle):
    with pytest.raises(UserError, match=needle):
        from raycap.runtime.controller import Controller

        Controller(config(tiny_world_dir, override), tmp_path)


def test_zero_workers_is_a_config_error(tiny_world_dir):
    with pytest.raises(UserError, match="rollout_workers"):
        config(tiny_world_dir, "runtime.rollout_workers=0")


def test_a_killed_reward_service_is_restarted_with_its_splits(tiny_world_dir, tmp_path, monkeypatch):
    """The splits reach the reward service so that a restart gets them again: no actor the controller starts
    with restarts has a constructor argument in the object store (which Ray does not keep for a restart, and warns
    of once per process), and a killed reward service comes back and serves the run."""
    import ray.actor

    from raycap.runtime.controller import Controller

    created, remote = [], ray.actor.ActorClass._remote

    def spy(self, args=None, kwargs=None, **options):
        created.append((self.__ray_metadata__.class_name, args or (), options.get("max_restarts")))
        return remote(self, args=args, kwargs=kwargs, **options)

    monkeypatch.setattr(ray.actor.ActorClass, "_remote", spy)
    c = Controller(config(tiny_world_dir, "rl.steps=3"), tmp_path)
    try:
        assert "RewardService" in [name for name, _, _ in created]
        stored = [name for name, args, restarts in created if restarts
                  and any(isinstance(a, ray.ObjectRef) for a in args)]
        assert stored == []
        c.run_step(0, None)
        before = ray.get(c.reward.pid.remote())
        os.kill(before, signal.SIGKILL)
        for step in range(1, 3):
            record, _ = c.run_step(step, None)
        assert ray.get(c.reward.pid.remote()) != before and c.version == 3 and record["step_seconds"] > 0
        assert c.evaluate("val")["n_images"] > 0
    finally:
        c.shutdown()
