"""One device policy for every role (`raycap.models.devices.resolve_device`), on CPU with fake GPU lists."""
import pytest
import torch

from raycap.config import load_config
from raycap.errors import UserError
from raycap.models.devices import resolve_device


def test_auto_follows_the_gpus_ray_gave_the_role():
    assert resolve_device("auto", gpu_ids=[3]) == torch.device("cuda", 0)  # Ray exposes its GPU as cuda:0
    assert resolve_device("auto", gpu_ids=[]) == torch.device("cpu")  # none reserved: CPU even if cuda is visible
    assert resolve_device("auto", gpu_ids=[], cuda_count=8) == torch.device("cpu")


def test_auto_outside_ray_uses_a_visible_gpu():
    assert resolve_device("auto", cuda_count=2) == torch.device("cuda", 0)
    assert resolve_device("auto", cuda_count=0) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0 if
                                                  torch.cuda.is_available() else None)


def test_an_explicit_device_overrides_the_policy():
    assert resolve_device("meta", gpu_ids=[0]) == torch.device("meta")
    assert resolve_device("cpu", cuda_count=4) == torch.device("cpu")
    assert resolve_device("cuda:1", gpu_ids=[]) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu0")


def test_the_runtime_device_setting_is_checked_at_load():
    assert load_config("world-demo", ["runtime.device=cuda:1"]).runtime.device == "cuda:1"
    with pytest.raises(UserError, match="runtime.device"):
        load_config("world-demo", ["runtime.device=gpu"])


def test_a_rollout_actor_without_a_gpu_builds_its_policy_on_the_cpu(monkeypatch):
    from raycap.runtime import resources

    monkeypatch.setattr(resources.ray, "get_gpu_ids", lambda: [])
    assert resources.role_device("auto") == torch.device("cpu")
    monkeypatch.setattr(resources.ray, "get_gpu_ids", lambda: [1])
    assert resources.role_device("auto") == torch.device("cuda", 0)


def test_every_role_builds_its_models_on_the_device_it_was_given(tiny_world_dir):
    from raycap.config import RunConfig
    from raycap.roles import build_role_models

    cfg = RunConfig.model_validate({"data": {"path": str(tiny_world_dir)},
                                    "retriever": {"path": str(tiny_world_dir / "retriever")},
                                    "captioner": {"path": str(tiny_world_dir / "captioner")}})
    models = build_role_models(cfg, "meta", reference=True, retriever=True)
    for name, module in [("policy", models.policy), ("reference", models.reference),
                         ("retriever", models.retriever.model)]:
        devices = {t.device.type for t in [*module.parameters(), *module.buffers()]}
        assert devices == {"meta"}, name
    assert models.policy.device == torch.device("meta") and models.dtype is None
    assert not any(p.requires_grad for p in models.reference.parameters())
    assert models.retriever.pixel_mean.device.type == "meta"  # what encodes pixels and text follows the model


def test_precision_auto_is_bf16_on_cuda_only(monkeypatch):
    from raycap.models.precision import autocast, compute_dtype

    assert compute_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA device that supports bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100: fp32
    assert compute_dtype("auto", torch.device("cuda")) is None
    assert compute_dtype("fp32", torch.device("cuda")) is None
    assert compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_a_local_ray_without_gpus_refuses_roles_that_reserve_them():
    from raycap.config import RuntimeConfig
    from raycap.runtime.resources import check_local_gpus

    with pytest.raises(UserError, match="gpus_per_learner 1, gpus_per_reward 0.5 but this machine has no GPU"):
        check_local_gpus(RuntimeConfig(gpus_per_learner=1, gpus_per_reward=0.5), visible=0)
    check_local_gpus(RuntimeConfig(gpus_per_learner=1), visible=1)
    check_local_gpus(RuntimeConfig(gpus_per_learner=1, num_gpus=2), visible=0)  # a local Ray told it has GPUs
    check_local_gpus(RuntimeConfig(), visible=0)
