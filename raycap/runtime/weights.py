"""Moving the learner's trainable weights to the rollout workers, with a version number.

Three modes behind `WeightSync` (the controller's side) and `receive_weights` (a worker's side):

- `object_store` (CPU default): learner rank 0 returns its trainable weights as one flat numpy array (a task
  result, kept in the object store; one array moves about 4x faster than a dict of 56 tensors, and a worker
  reads it without a copy); the controller hands the reference (inside a list, so Ray does not fetch it eagerly) to
  every rollout call, and a worker fetches it only when its own version is older. A restarted worker catches up
  the same way, so fault tolerance needs nothing extra.
- `colocated` (one GPU, verl's hybrid engine): the learner ranks decode their own shards with the engine's
  module, one copy of the weights, nothing moves.
- `nccl` (several GPUs): learner rank 0 and the rollout workers form a separate process group (its own TCP
  store, outside the learners' DeepSpeed group) and rank 0 broadcasts each trainable tensor in place. A worker
  that Ray restarted is in no group: the controller re-forms the group (rank 0 starts a new one, every worker
  joins it) and broadcasts the current weights before the next rollouts.
  `collective_backend: gloo` runs the very same broadcast on CPU, which is how it is tested without GPUs.
"""
from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_weights(model: torch.nn.Module) -> np.ndarray:
    """The trainable parameters, in `parameters()` order, as one flat CPU array."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).cpu() for p in _trainable(model)]).numpy()


def load_flat_weights(model: torch.nn.Module, flat: np.ndarray) -> None:
    """Copy a `flat_weights` array (same architecture, same trainable set) into the model."""
    params = _trainable(model)
    total = sum(p.numel() for p in params)
    if flat.size != total:
        raise ValueError(f"flat weights hold {flat.size} values, the model trains {total}")
    # `flat` is usually a read-only view of Ray's object store: wrapping it in a tensor (from_numpy, frombuffer)
    # warns that the tensor would be non-writable, so each parameter copies straight from the numpy slice (one
    # copy, as before: into a CPU parameter's own memory, or through torch.tensor's copy onto its device)
    offset = 0
    with torch.no_grad():
        for p in params:
            chunk = flat[offset:offset + p.numel()].reshape(p.shape)
            if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64, torch.float16):
                np.copyto(p.detach().numpy(), chunk)  # casts as copy_ would
            else:
                p.copy_(torch.tensor(chunk, device=p.device, dtype=p.dtype))
            offset += p.numel()


def master_store(host: str, world_size: int, timeout_s: float = 300) -> dist.TCPStore:
    """A rendezvous store bound once, on a port the OS picks (`.port`): handing out a free port and binding it
    later races with every other process on the node."""
    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


class BroadcastGroup:
    """A process group of learner rank 0 (group rank 0) and the rollout workers, for weight broadcast."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300,
                 store: dist.TCPStore | None = None):
        """Rank 0 passes the `store` it bound with `master_store` (so no other process can take its port between
        choosing it and binding it); the others connect to `host:port`."""
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        timeout = timedelta(seconds=timeout_s)  # how long a collective waits for a missing rank
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, timeout)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"unknown collective backend {backend!r}")
        self.store, self.rank = store, rank

    def close(self) -> None:
        """Abort the group (a member may be dead: nothing waits on it); a new group replaces it."""
        self.group.abort()
        self.group = self.store = None

    def broadcast(self, model: torch.nn.Module) -> float:
        """Send (rank 0) or receive (others) every trainable tensor in place; returns the seconds taken."""
        t = time.perf_counter()
        with torch.no_grad():
            for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                buf = p.data if p.device == self.device else p.data.to(self.device)
                opts = dist.BroadcastOptions()
                opts.rootRank = 0
                self.group.broadcast([buf], opts).wait()
                if buf is not p.data:
                    p.data.copy_(buf)
        return time.perf_counter() - t
