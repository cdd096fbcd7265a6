"""Starting (or joining) Ray: `start_ray`, bound to loopback unless the config says otherwise, with raycap's job
environment. The Ray runtime, a Tune search and the embedding cache's local Ray (`raycap.inputs.local_ray_for`,
used by the single-process loop too) all start Ray here; Ray itself is imported only when it starts, so
importing this module (and what imports it) does not load Ray."""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from contextlib import contextmanager

from raycap.config import RuntimeConfig, is_loopback
from raycap.errors import UserError
from raycap.progress import quiet_logger


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook` for raycap's jobs: drops known-harmless library notices at their
    source in every worker process, before an actor imports anything (errors and other warnings still show)."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_drop_no_cuda_runtime)


def _drop_no_cuda_runtime(record: logging.LogRecord) -> bool:
    # torch warns "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed loads its CPU ops on a machine
    # with a CUDA toolkit but no GPU: irrelevant to a CPU actor
    return not str(record.msg).startswith("No CUDA runtime is found")


JOB_RUNTIME_ENV = {"worker_process_setup_hook": "raycap.ray_start.quiet_worker"}
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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host`, chosen by the OS."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    """Nothing listens on host:port (a port left in TIME_WAIT by a Ray that stopped counts as free, as for Ray)."""
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:  # only "in use" counts: any other error is Ray's to report as it does
            return e.errno != errno.EADDRINUSE
    return True


def dashboard_port(rt: RuntimeConfig) -> int:
    """The port a local Ray's dashboard takes: `rt.dashboard_port` when free; when that is the default (8265) and in
    use (another Ray or raycap run on this machine), a free one, which the printed dashboard address shows; another
    port in use is a one-line UserError."""
    if _port_free(rt.dashboard_host, rt.dashboard_port):
        return rt.dashboard_port
    if rt.dashboard_port != RuntimeConfig.model_fields["dashboard_port"].default:  # a port chosen, not the default
        raise UserError(f"runtime.dashboard_port {rt.dashboard_port}: {rt.dashboard_host}:{rt.dashboard_port} is in "
                        "use (another Ray or raycap run?); give a free port, or leave it unset to take one")
    return free_port(rt.dashboard_host)


def start_ray(rt: RuntimeConfig) -> tuple[bool, str | None]:
    """Join `rt.address` (or the cluster of a Ray job: RAY_ADDRESS) or start a local Ray bound to loopback
    (dashboard on `rt.dashboard_host`, which the config accepts off loopback only with `allow_public_dashboard`).
    Returns whether this call started Ray (so the run shuts it down) and the dashboard's address (None if Ray was
    already up)."""
    import ray

    if ray.is_initialized():
        return False, None
    address = rt.address or os.environ.get("RAY_ADDRESS")  # set by Ray for a job (`ray job submit`)
    if address:
        ctx = ray.init(address=address, runtime_env=JOB_RUNTIME_ENV)
    else:
        port = dashboard_port(rt)
        if not is_loopback(rt.dashboard_host):
            print(f"warning: runtime.dashboard_host={rt.dashboard_host}: Ray's dashboard and its Jobs API listen "
                  f"on port {port} of that interface, and anyone who can reach that port can submit "
                  "jobs, that is run code on this machine, unless they lack the cluster's token (Ray token "
                  "authentication); keep it to trusted networks (runtime.allow_public_dashboard is true)",
                  file=sys.stderr)
        # Ray >= 2.59 turns token authentication on for a cluster ray.init starts, and logs a notice saying so
        # at WARNING on every start: that is the secure default working, not a problem, so it is not shown
        with _loopback_node(), quiet_logger("ray._private.authentication.authentication_token_setup"):
            ctx = ray.init(num_cpus=rt.num_cpus or os.cpu_count(), num_gpus=rt.num_gpus, include_dashboard=True,
                           dashboard_host=rt.dashboard_host, dashboard_port=port,
                           runtime_env=JOB_RUNTIME_ENV)
        node_ip = ctx.address_info.get("node_ip_address")
        if node_ip and not is_loopback(node_ip):
            print(f"warning: the local Ray's node IP is {node_ip}, not loopback: its ports listen on that "
                  "interface", file=sys.stderr)
    return True, ctx.dashboard_url
