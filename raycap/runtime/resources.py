"""Starting (or joining) Ray and reserving every role's resources in one placement group, failing fast with a
one-line error when the config asks for more than the cluster has."""
from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raycap.config import RuntimeConfig, is_loopback
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


def role_device(setting: str = "auto"):
    """This actor's device under the one policy (`raycap.models.devices.resolve_device`): the GPU Ray assigned
    it, else the CPU (or `setting` when not `auto`)."""
    from raycap.models.devices import resolve_device

    return resolve_device(setting, gpu_ids=ray.get_gpu_ids())


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook` for raycap's jobs: drops known-harmless library notices at their
    source in every worker process, before an actor imports anything (errors and other warnings still show)."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_drop_no_cuda_runtime)


def _drop_no_cuda_runtime(record: logging.LogRecord) -> bool:
    # torch warns "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed loads its CPU ops on a machine
    # with a CUDA toolkit but no GPU: irrelevant to a CPU actor
    return not str(record.msg).startswith("No CUDA runtime is found")


JOB_RUNTIME_ENV = {"worker_process_setup_hook": "raycap.runtime.resources.quiet_worker"}
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node IP is 127.0.0.1 (as on macOS/Windows)


@contextmanager
def _loopback_node():
    """While a local Ray starts: its node IP is 127.0.0.1, so the GCS, raylet, object manager, dashboard agent,
    runtime-env agent, metrics and worker ports listen on loopback instead of every interface (Ray resolves
    `ray.init(_node_ip_address="127.0.0.1")` back to the external IP, so that flag cannot do it). The setting is
    Ray's own switch for single-machine clusters; the processes started meanwhile inherit it, and it is undone
    afterwards so a later `ray.init(address=...)` of this process is unaffected."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ONLY_ENV] = "0"  # the raylet, GCS and agents started by ray.init
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process (read once, at import)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ONLY_ENV, None)
        else:
            os.environ[LOOPBACK_ONLY_ENV] = saved_env


@contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)


def start_ray(rt: RuntimeConfig) -> tuple[bool, str | None]:
    """Join `rt.address` (or the cluster of a Ray job: RAY_ADDRESS) or start a local Ray bound to loopback (dashboard on `rt.dashboard_host`, which the
    config accepts off loopback only with `allow_public_dashboard`). Returns whether this call started Ray (so
    the run shuts it down) and the dashboard's address (None if Ray was already up)."""
    if ray.is_initialized():
        return False, None
    address = rt.address or os.environ.get("RAY_ADDRESS")  # set by Ray for a job (`ray job submit`)
    if address:
        ctx = ray.init(address=address, runtime_env=JOB_RUNTIME_ENV)
    else:
        if not is_loopback(rt.dashboard_host):
            print(f"warning: runtime.dashboard_host={rt.dashboard_host}: Ray's dashboard and its Jobs API listen "
                  f"on port {rt.dashboard_port} of that interface, and anyone who can reach that port can submit "
                  "jobs, that is run code on this machine, unless they lack the cluster's token (Ray token "
                  "authentication); keep it to trusted networks (runtime.allow_public_dashboard is true)",
                  file=sys.stderr)
        # Ray >= 2.59 turns token authentication on for a cluster ray.init starts, and logs a notice saying so
        # at WARNING on every start: that is the secure default working, not a problem, so it is not shown
        with _loopback_node(), _quiet_logger("ray._private.authentication.authentication_token_setup"):
            ctx = ray.init(num_cpus=rt.num_cpus or os.cpu_count(), num_gpus=rt.num_gpus, include_dashboard=True,
                           dashboard_host=rt.dashboard_host, dashboard_port=rt.dashboard_port,
                           runtime_env=JOB_RUNTIME_ENV)
        node_ip = ctx.address_info.get("node_ip_address")
        if node_ip and not is_loopback(node_ip):
            print(f"warning: the local Ray's node IP is {node_ip}, not loopback: its ports listen on that "
                  "interface", file=sys.stderr)
    return True, ctx.dashboard_url


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
