"""The roles' code on a second device, on a CPU-only machine (`device_guard.SecondDevice`): one update of the
reference loop and of the Ray runtime's rollout worker and reward service, with every model and the scorer's pool
on the second device while batches, indices and generators live on the CPU, as on a GPU. An op that would mix
devices on a GPU fails here."""
from types import SimpleNamespace

import pytest
import torch

from device_guard import SECOND, DeviceMixError, SecondDevice
from raycap.config import load_config
from raycap.data import distractors
from world_runs import world_sets


def test_the_guard_fails_what_a_gpu_refuses_and_allows_what_it_allows():
    pool = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    with SecondDevice() as guard:
        on = pool.to(guard.device)
        assert on.device == SECOND and (on * 2).device == SECOND and on[torch.tensor([1, 2])].device == SECOND
        assert (on + torch.tensor(1.0)).device == SECOND  # a CPU scalar is fine, as on CUDA
        assert on.cpu().device.type == "cpu" and torch.equal(on.cpu(), pool)
        for bad in (lambda: on + pool, lambda: torch.isin(torch.arange(3), on.long()), lambda: on.numpy(),
                    lambda: torch.cat([on, pool]), lambda: pool[torch.arange(2).to(guard.device)],
                    lambda: torch.rand(3, generator=torch.Generator(), device=guard.device)):
            with pytest.raises(DeviceMixError):
                bad()
        model = torch.nn.Linear(8, 2).to(guard.device)
        model(on).sum().backward()
        torch.optim.Adam(model.parameters()).step()
        assert model.weight.device == model.weight.grad.device == SECOND


def test_hard_distractors_from_a_pool_on_the_second_device():
    """The defect a GPU scorer met: a pool on the GPU compared with the batch's CPU indices."""
    pool = torch.nn.functional.normalize(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = distractors.candidates(torch.arange(12), pool, 3, 0.99, 12, generator=torch.Generator().manual_seed(1))
    with SecondDevice() as guard:
        got = distractors.candidates(torch.arange(12), pool.to(guard.device), 3, 0.99, 12,
                                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, expected)


def config(world, *sets):
    return load_config("world-demo", [*world_sets(world), "rl.batch_size=12", "rl.reward.num_candidates=12",
                                      "rl.reward.hard_distractors=3", "rl.sampling.max_new_tokens=8",
                                      "eval.images=100", "threads=2", *sets])


def test_one_update_and_evaluation_of_the_reference_loop_on_a_second_device(tiny_world_dir, tmp_path, monkeypatch):
    from raycap import local_trainer

    monkeypatch.setattr(local_trainer, "resolve_device", lambda device: SECOND)
    with SecondDevice() as guard:
        trainer = local_trainer.LocalTrainer(config(tiny_world_dir), tmp_path / "run", log=lambda *a: None)
        assert trainer.policy.device == trainer.reference.device == trainer.scorer.images.device == SECOND
        stats = trainer.update(0)
        metrics = trainer.evaluate("val")
    assert stats["sync_changed"] == 1.0 and 0 <= metrics["p_at_1"] <= 1
    assert guard.ops.get("linear", 0) > 10  # the models did run on the second device


def test_one_step_of_the_ray_roles_on_a_second_device(tiny_world_dir, monkeypatch):
    """The reward service (batch and hard distractors, scores, an evaluation) and a rollout worker (a weight load,
    a sampled and a greedy shard) built by the roles' own code on the second device, called in this process with
    Ray's object fetch standing in. (The learner's update math is the reference loop's, checked above.)"""
    import ray

    from raycap.inputs import load_captioner, load_retriever, open_splits
    from raycap.runtime import resources
    from raycap.runtime.reward import RewardService
    from raycap.runtime.rollout import RolloutWorker

    cfg = config(tiny_world_dir)
    splits = open_splits(cfg, load_retriever(cfg.retriever), lambda *a: None, load_captioner(cfg.captioner.path)[0])
    monkeypatch.setattr(resources, "role_device", lambda device: SECOND)
    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the "object refs" below are the objects themselves
    holder = SimpleNamespace(get=SimpleNamespace(remote=lambda: [splits]))  # the named SplitsHolder actor
    monkeypatch.setattr(ray, "get_actor", lambda name: holder if name == "splits-holder" else None)
    with SecondDevice() as guard:
        reward = RewardService(cfg.model_dump_json(), "splits-holder")
        worker = RolloutWorker(cfg.model_dump_json(), 0)
        assert reward.scorer.images.device == worker.policy.device == SECOND
        _, img, cands = reward.batch(0)
        assert img.device.type == cands.device.type == "cpu"  # what reaches the controller
        weights = worker.weights()
        weights[:] = weights + 0.01  # a new version: the worker loads it before decoding
        out = worker.rollout(0, img, 1, [weights])
        greedy = worker.rollout(0, img, 1, None, greedy=True)
        scores, _ = reward.score(cands, out["tokens"], out["lengths"], 0)
        metrics = reward.evaluate([weights], 100, "val")
    assert out["sync_changed"] is True and out["tokens"].device.type == "cpu"
    assert greedy["tokens"].shape[0] * cfg.rl.sampling.num_samples == out["tokens"].shape[0]
    assert scores.reward.shape[0] == out["tokens"].shape[0] and 0 <= metrics["p_at_1"] <= 1
