"""RolloutWorker: a captioner copy that decodes its shard of each batch with the newest weights it was given."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from raycap.config import RunConfig
from raycap.models.decode import rollout_decoder
from raycap.rl import algorithm
from raycap.roles import build_role_models
from raycap.runtime import resources
from raycap.runtime.weights import BroadcastGroup, flat_weights, load_flat_weights


def captions_payload(caps, version: int, **extra) -> dict:
    """What a rollout returns: token ids, lengths, per-token log-probs under the behaviour policy, version."""
    return {"tokens": caps.tokens.cpu(), "lengths": caps.lengths.cpu(), "logprobs": caps.logprobs.cpu(),
            "version": version, **extra}


class StaleWeights(RuntimeError):
    """A worker asked to decode a newer version than it holds, with no weights to load (a worker Ray restarted in
    the middle of a task under weight_sync=nccl: the controller rejoins it to the broadcast and asks again)."""


class RolloutWorker:
    """Holds a frozen copy of the captioner; decodes greedy / sampled (KV cache) for one shard of each batch."""

    def __init__(self, config_json: str, shard: int):
        self.cfg = RunConfig.model_validate_json(config_json)
        self.threads = resources.apply_threads(self.cfg.threads)  # its CPU share, or `threads`
        self.shard, self.version = shard, 0
        # the learner's trainable set (and adapters), which weight movement addresses
        self.models = build_role_models(self.cfg, resources.role_device(self.cfg.runtime.device))
        self.policy, self.device = self.models.policy.eval(), self.models.device
        self.decoder = rollout_decoder(self.policy)  # the static-cache decoder on CUDA
        self.group: BroadcastGroup | None = None

    def pid(self) -> int:
        return os.getpid()

    def weights(self):
        return flat_weights(self.policy)

    def has_group(self) -> bool:
        """Whether this worker is in a broadcast group (a worker Ray restarted is in none until it rejoins)."""
        return self.group is not None

    def join_broadcast(self, backend: str, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the learner's broadcast group as `rank`, leaving the one it was in (the group is re-formed when a
        worker was restarted)."""
        if self.group is not None:
            self.group.close()
            self.group = None
        self.group = BroadcastGroup(backend, host, port, rank, world_size)

    def receive_broadcast(self, version: int) -> bool:
        """Receive the learner's weights of `version`; returns whether they changed this worker's weights."""
        if self.group is None:
            raise RuntimeError(f"rollout worker {self.shard} is in no broadcast group (restarted and not rejoined)")
        changed = algorithm.changes_weights(self.policy, lambda: self.group.broadcast(self.policy))
        self.version = version
        return changed

    def rollout(self, step: int, img: torch.Tensor, version: int, weights: list | None, greedy: bool = False) -> dict:
        """Decode this worker's shard. If the worker's copy is older than `version`, first load `weights` (a
        one-element list holding the object ref of the learner's flat trainable weights); `sync_changed` then says
        whether loading them changed this worker's weights (None when nothing was loaded)."""
        sync, changed = 0.0, None
        if version != self.version:
            if not weights:
                raise StaleWeights(f"rollout worker {self.shard} holds weights v{self.version}, asked for v{version} "
                                   "without a reference to them")
            import ray

            t = time.perf_counter()
            flat = ray.get(weights[0])
            changed = algorithm.changes_weights(self.policy, lambda: load_flat_weights(self.policy, flat))
            sync, self.version = time.perf_counter() - t, version
        t = time.perf_counter()
        with torch.no_grad(), self.models.autocast():
            caps = algorithm.rollout(self.policy, img.to(self.device), self.cfg, step, self.shard, greedy=greedy,
                                     decoder=self.decoder)
        return captions_payload(caps, self.version, sync_seconds=sync, decode_seconds=time.perf_counter() - t,
                                pid=os.getpid(), sync_changed=changed)
