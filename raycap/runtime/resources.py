"""Starting (or joining) Ray (`raycap.ray_start`, whose names this module re-exports) and reserving every role's
resources in one placement group, failing fast with a one-line error when the config asks for more than the
cluster has."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raycap.config import RuntimeConfig
from raycap.errors import UserError
from raycap.ray_start import JOB_RUNTIME_ENV, LOOPBACK_ONLY_ENV, start_ray  # noqa: F401


@dataclass
class Roles:
    """How many actors of each role the run needs, and each one's bundle."""
    rollout: int
    learner: int
    reward: int = 1

    @classmethod
    def of(cls, rt: RuntimeConfig) -> Roles:
        return cls(0 if rt.weight_sync == "colocated" else rt.rollout_workers, rt.learner_workers)

    def bundles(self, rt: RuntimeConfig) -> list[dict]:
        def bundle(cpu, gpu):
            return {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
        return ([bundle(rt.cpus_per_learner, rt.gpus_per_learner)] * self.learner
                + [bundle(rt.cpus_per_rollout, rt.gpus_per_rollout)] * self.rollout
                + [bundle(rt.cpus_per_reward, rt.gpus_per_reward)] * self.reward)


def role_device(setting: str = "auto"):
    """This actor's device under the one policy (`raycap.models.devices.resolve_device`): the GPU Ray assigned
    it, else the CPU (or `setting` when not `auto`)."""
    from raycap.models.devices import resolve_device

    return resolve_device(setting, gpu_ids=ray.get_gpu_ids())


def check_local_gpus(rt: RuntimeConfig, visible: int | None = None) -> None:
    """Before a local Ray starts: a one-line UserError if the roles reserve GPUs this machine does not have
    (`visible`: the CUDA devices torch sees, or `runtime.num_gpus` when set)."""
    need = {k: getattr(rt, k) for k in ("gpus_per_learner", "gpus_per_rollout", "gpus_per_reward") if getattr(rt, k)}
    have = rt.num_gpus if rt.num_gpus is not None else (
        torch_cuda_count() if visible is None else visible)
    if need and not have:
        raise UserError("runtime: " + ", ".join(f"{k} {v:g}" for k, v in need.items()) + " but this machine has no "
                        "GPU: set them to 0 (--set runtime.gpus_per_learner=0 ...) or use --runtime local, which "
                        "needs none")


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_resources(rt: RuntimeConfig) -> None:
    """A one-line UserError if the roles' totals exceed what the Ray cluster has."""
    roles = Roles.of(rt)
    have = ray.cluster_resources()
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0) for b in roles.bundles(rt))
        if need > have.get(kind, 0) + 1e-9:
            raise UserError(f"runtime: the roles need {need:g} {kind} ({roles.learner} learner, {roles.rollout} "
                            f"rollout, {roles.reward} reward actors) but the Ray cluster has {have.get(kind, 0):g}")


def trial_bundles(rt: RuntimeConfig, controller_cpus: float) -> list[dict]:
    """The bundles of a Tune trial on the Ray runtime: the trial's own process (the controller) first, then one
    per actor as `reserve` lays them out."""
    return [{"CPU": controller_cpus}] + Roles.of(rt).bundles(rt)


def reserve(rt: RuntimeConfig):
    """`(placement group, index of the first actor bundle)`: one bundle per actor (learners, then rollouts, then
    the reward service). Inside a placement group whose bundles after the first match (a Tune trial reserved
    with `trial_bundles`), that group at index 1; otherwise a new group at index 0."""
    from ray.util import get_current_placement_group

    current = get_current_placement_group()
    if current is not None:
        wanted = Roles.of(rt).bundles(rt)
        if current.bundle_specs[1:] != wanted:
            raise UserError(f"runtime: the trial's placement group has bundles {current.bundle_specs[1:]} but the "
                            f"run's roles need {wanted}")
        return current, 1
    check_resources(rt)
    pg = placement_group(Roles.of(rt).bundles(rt), strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=rt.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise UserError(f"runtime: the placement group was not ready after {rt.placement_timeout_s:g} s "
                        "(resources held by another job, or no node can hold a bundle)") from None
    return pg, 0


THREADS_ENV = "RAYCAP_THREADS"  # an actor's torch threads, set by `in_bundle`, applied by `apply_threads`


def actor_threads(cpus: float, override: int | None = None) -> int:
    """The torch/OpenMP threads of an actor holding `cpus` CPUs: the config's `threads` when set (for every
    actor), else its CPU share rounded up, at least 1 (0.5 -> 1, 1 -> 1, 1.5 -> 2)."""
    return override or max(1, math.ceil(cpus - 1e-9))


def apply_threads(override: int | None = None) -> int:
    """In an actor: `torch.set_num_threads` to the number `in_bundle` put in its environment (outside Ray:
    `override`, else all cores). Returns it."""
    import torch

    n = int(os.environ.get(THREADS_ENV) or 0) or override or os.cpu_count()
    torch.set_num_threads(n)
    return n


def in_bundle(pg, index: int, cpus: float, gpus: float, threads: int | None = None) -> dict:
    """`.options(...)` placing an actor in bundle `index` with `actor_threads(cpus, threads)` torch and OpenMP
    threads (OMP_NUM_THREADS is set before torch is imported: torch imported under OMP_NUM_THREADS=1 stays about
    10% slower even after `torch.set_num_threads`, measured on the world learner step)."""
    n = str(actor_threads(cpus, threads))
    return {"num_cpus": cpus, "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": n, THREADS_ENV: n, **quiet_env(gpus)}}}


def quiet_env(gpus: float) -> dict[str, str]:
    """Environment of an actor that keeps known-harmless library notices out of the run's output: transformers'
    per-load progress bars (an actor's output is a log, where a bar is one carriage-return-joined line) and, for
    an actor without a GPU, DeepSpeed's "Setting accelerator to CPU. If you have GPU ... unable to detect it"
    (it is told the accelerator instead of guessing it)."""
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **({} if gpus else {"DS_ACCELERATOR": "cpu"})}
