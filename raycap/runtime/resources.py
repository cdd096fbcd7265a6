"""Starting (or joining) Ray and reserving every role's resources in one placement group, failing fast with a
one-line error when the config asks for more than the cluster has."""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raycap.config import RuntimeConfig
from raycap.errors import UserError


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


def start_ray(rt: RuntimeConfig) -> tuple[bool, str | None]:
    """Join `rt.address` or start a local Ray (dashboard on `rt.dashboard_host`). Returns whether this call
    started Ray (so the run shuts it down) and the dashboard's address (None if Ray was already up)."""
    if ray.is_initialized():
        return False, None
    if rt.address:
        ctx = ray.init(address=rt.address)
    else:
        ctx = ray.init(num_cpus=rt.num_cpus or os.cpu_count(), num_gpus=rt.num_gpus, include_dashboard=True,
                       dashboard_host=rt.dashboard_host, dashboard_port=rt.dashboard_port)
    return True, ctx.dashboard_url


def check_resources(rt: RuntimeConfig) -> None:
    """A one-line UserError if the roles' totals exceed what the Ray cluster has."""
    roles = Roles.of(rt)
    have = ray.cluster_resources()
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0) for b in roles.bundles(rt))
        if need > have.get(kind, 0) + 1e-9:
            raise UserError(f"runtime: the roles need {need:g} {kind} ({roles.learner} learner, {roles.rollout} "
                            f"rollout, {roles.reward} reward actors) but the Ray cluster has {have.get(kind, 0):g}")


def reserve(rt: RuntimeConfig):
    """A placement group with one bundle per actor (learners, then rollouts, then the reward service)."""
    check_resources(rt)
    pg = placement_group(Roles.of(rt).bundles(rt), strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=rt.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise UserError(f"runtime: the placement group was not ready after {rt.placement_timeout_s:g} s "
                        "(resources held by another job, or no node can hold a bundle)") from None
    return pg


def in_bundle(pg, index: int, cpus: float, gpus: float, threads: int) -> dict:
    """`.options(...)` placing an actor in bundle `index` with `threads` OpenMP threads. Ray would set
    OMP_NUM_THREADS to the actor's CPU share (1 for a fraction), and torch imported under OMP_NUM_THREADS=1
    stays about 10% slower even after `torch.set_num_threads` (measured on the world learner step)."""
    return {"num_cpus": cpus, "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}
