"""Learner: one rank of a DeepSpeed data-parallel group that applies the REINFORCE (or Gumbel) update.

Why an actor group with `torch.distributed` rather than Ray Train's `TorchTrainer`: the controller drives the
learner one update at a time, between rollouts and rewards it schedules itself, and reads the update's
statistics back synchronously; `TorchTrainer` runs a whole training function to completion and owns the loop.
So, as OpenRLHF does, each rank is a Ray actor that joins one process group (gloo on CPU, NCCL on GPUs) and
wraps the captioner in a DeepSpeed engine (ZeRO stage from the config). Each rank holds the frozen reference
captioner for the KL guard and, in Gumbel mode, the frozen retriever (gradients flow through its text encoder
into the captioner). In `colocated` mode a rank also decodes its own shard with the engine's module.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from raycap.config import RunConfig
from raycap.models.decode import rollout_decoder
from raycap.rl import algorithm
from raycap.roles import build_role_models, optimizer
from raycap.runtime import resources
from raycap.runtime.rollout import captions_payload
from raycap.runtime.weights import BroadcastGroup, flat_weights, master_store


def scratch_dir() -> str | None:
    """Where a rank puts its temporary files (checkpoints in transit): $RAYCAP_SCRATCH, else the system temp."""
    path = os.environ.get("RAYCAP_SCRATCH")
    if path:
        os.makedirs(path, exist_ok=True)
    return path or None


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


@contextlib.contextmanager
def _without_build_notice():
    """DeepSpeed `print`s "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" when it sets up
    its communication backend: a notice, not a problem. Drop that one line; anything else printed goes through."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        rest = [line for line in buf.getvalue().splitlines() if not line.endswith(" built successfully")]
        if rest:
            print("\n".join(rest))


CLIP_NORM = 1.0  # as the reference loop


def deepspeed_config(cfg: RunConfig, rows_per_rank: int) -> dict:
    """Adam (passed in as the client optimizer: plain torch Adam at a constant lr, as the reference loop, fused on
    CUDA), ZeRO stage from the config, fp32 weights (bf16 is autocast around the forward passes, so the weights
    the optimizer updates stay the fp32 masters), one gradient-accumulation micro-step per `rl.optimiser.micro_batch`.
    Gradients are clipped to norm 1.0: by DeepSpeed under ZeRO 1-2 (the gradients are partitioned), and without
    ZeRO by the reference loop's own `clip_grad_norm_` after the all-reduce, so that one rank reproduces the
    reference loop's updates bit for bit."""
    world, zero = cfg.runtime.learner_workers, cfg.runtime.zero_stage
    images = cfg.rl.batch_size // world
    micro = 1 if cfg.rl.method == "gumbel" else len(algorithm.micro_batches(images, cfg.rl.optimiser.micro_batch))
    return {"train_batch_size": rows_per_rank * world, "train_micro_batch_size_per_gpu": rows_per_rank // micro,
            "gradient_accumulation_steps": micro, "gradient_clipping": CLIP_NORM if zero else 0.0,
            "zero_optimization": {"stage": cfg.runtime.zero_stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class Learner:
    """Created on its bundle first; `setup` then joins the process group (rank 0's address, found by
    `address()` on rank 0's own node) and builds the DeepSpeed engine."""

    def __init__(self, config_json: str, rank: int):
        self.cfg = RunConfig.model_validate_json(config_json)
        self.threads = resources.apply_threads(self.cfg.threads)  # its CPU share, or `threads`
        torch.manual_seed(self.cfg.seed + rank)
        self.rank, self.version = rank, 0
        self.group: BroadcastGroup | None = None
        self._joiner = None

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address: its store is bound here, once, and kept for `setup`."""
        host = node_address()
        self._store = master_store(host, self.cfg.runtime.learner_workers)
        return host, self._store.port

    def setup(self, master_addr: str, master_port: int, images: torch.Tensor | None = None) -> None:
        import deepspeed

        cfg, rt = self.cfg, self.cfg.runtime
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(rt.learner_workers), LOCAL_RANK="0")
        device = resources.role_device(rt.device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = getattr(self, "_store", None) if self.rank == 0 else None
        if store is None:
            store = dist.TCPStore(master_addr, master_port, rt.learner_workers, is_master=False,
                                  timeout=timedelta(seconds=300))
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=rt.learner_workers)
        with _without_build_notice():  # DeepSpeed adopts the process group joined above
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        models = build_role_models(cfg, device, reference=True, retriever=cfg.rl.method == "gumbel")
        self.tokenizer, self.reference, self.autocast = models.tokenizer, models.reference, models.autocast
        samples = 1 if cfg.rl.method == "gumbel" else cfg.rl.sampling.num_samples
        rows = cfg.rl.batch_size * samples // rt.learner_workers
        self.engine, *_ = deepspeed.initialize(model=models.policy, optimizer=optimizer(models.policy, cfg),
                                               config=deepspeed_config(cfg, rows))
        self.device = self.engine.device
        self.reference.to(self.device)
        self.decoder = rollout_decoder(self.policy)  # colocated rollouts: the static-cache decoder on CUDA
        self.scorer = None
        if cfg.rl.method == "gumbel":
            self.scorer = algorithm.Scorer(models.retriever.to(self.device), images.to(self.device),
                                           self.tokenizer, models.policy.stop_ids, cfg)

    @property
    def policy(self):
        return self.engine.module

    def pid(self) -> int:
        return os.getpid()

    # -- the update ---------------------------------------------------------------------------------------
    def update(self, step: int, img, tokens, lengths, advantages, cands=None, publish: bool = False,
               behaviour_logprobs=None, rollout_logprobs=None):
        """One optimizer step on this rank's shard. Returns (statistics, the new trainable weights if
        `publish`, else None): the controller calls it with two returns, so under weight_sync=object_store
        the weights reach the object store without another round trip. `behaviour_logprobs`: the rollouts'
        per-token log-probs when an older policy sampled them (importance-weighted update); `rollout_logprobs`:
        the rollouts' per-token log-probs always (the `logprob_drift` statistics). Colocated, this rank decodes
        too: `sync_changed` says whether the step changed its weights."""
        t = time.perf_counter()
        img = img.to(self.device)
        if self.cfg.rl.method == "gumbel":
            with self.autocast():  # forward passes in the role's precision; backward and step outside
                loss, stats = algorithm.gumbel_loss(self.policy, self.reference, self.scorer, img,
                                                    cands.to(self.device), self.tokenizer.eos_token_id, self.cfg,
                                                    step, self.rank)
            algorithm.check_loss(loss, step)
            self.engine.backward(loss)
        else:  # micro-batches: DeepSpeed accumulates their gradients (gradient_accumulation_steps) to one step
            def backward(part_loss):
                self.engine.backward(part_loss, scale_wrt_gas=False)  # weighted by its share already
                if not self.engine.is_gradient_accumulation_boundary():
                    self.engine.step()  # DeepSpeed only counts the micro-step; the last one steps below

            loss, stats = algorithm.reinforce_backward(
                self.policy, self.reference, img, tokens.to(self.device), lengths.to(self.device),
                advantages.to(self.device), self.cfg, step, backward, self.autocast,
                None if behaviour_logprobs is None else behaviour_logprobs.to(self.device),
                None if rollout_logprobs is None else rollout_logprobs.to(self.device))
        if not self.cfg.runtime.zero_stage:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), CLIP_NORM)
        if self.cfg.runtime.weight_sync == "colocated":  # this rank's decoder is its engine's module
            stats["sync_changed"] = float(algorithm.changes_weights(self.policy, self.engine.step))
        else:
            self.engine.step()
        self.version += 1
        stats |= {"loss": float(loss.detach()), "learner_seconds": time.perf_counter() - t, "version": self.version}
        if not publish:
            return stats, None
        t = time.perf_counter()
        weights = flat_weights(self.policy)
        return stats | {"publish_seconds": time.perf_counter() - t}, weights

    # -- colocated rollouts -------------------------------------------------------------------------------
    def rollout(self, step: int, img, version: int, weights=None, greedy: bool = False) -> dict:
        """Decode this rank's shard with the engine's own weights (weight_sync=colocated)."""
        if version != self.version:
            raise RuntimeError(f"colocated rollout asked for v{version}, learner holds v{self.version}")
        t = time.perf_counter()
        with torch.no_grad(), self.autocast():
            caps = algorithm.rollout(self.policy, img.to(self.device), self.cfg, step, self.rank, greedy=greedy,
                                     decoder=self.decoder)
        return captions_payload(caps, self.version, sync_seconds=0.0, decode_seconds=time.perf_counter() - t,
                                pid=os.getpid())

    # -- weight movement ----------------------------------------------------------------------------------
    def publish(self):
        """The trainable weights as one flat array, returned through the object store."""
        return flat_weights(self.policy)

    def start_broadcast(self, backend: str, world_size: int) -> tuple[str, int]:
        """Start a broadcast group as its rank 0 (replacing an earlier one: the controller re-forms the group when a
        rollout worker was restarted); returns the address the workers join."""
        import threading

        self._leave_broadcast()
        host = node_address()
        store = master_store(host, world_size)  # bound here, so the port handed out is ours
        # rank 0 blocks until every worker joined: do it off the actor's thread
        self._joiner = threading.Thread(target=self._join_broadcast, args=(backend, host, store, world_size))
        self._joiner.start()
        return host, store.port

    def _join_broadcast(self, backend, host, store, world_size):
        self.group = BroadcastGroup(backend, host, store.port, 0, world_size, store=store)

    def _wait_joined(self) -> None:
        if self._joiner is not None:
            self._joiner.join()
            self._joiner = None

    def _leave_broadcast(self) -> None:
        self._wait_joined()
        if self.group is not None:
            self.group.close()
            self.group = None

    def send_broadcast(self) -> float:
        self._wait_joined()
        return self.group.broadcast(self.policy)

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, tag: str, client_state: dict) -> dict[str, bytes]:
        """This rank's part of a checkpoint as {path relative to the checkpoint dir: bytes}: what its DeepSpeed
        `save_checkpoint` wrote (model states and `latest` from rank 0, each rank's ZeRO shard) plus, from
        rank 0, a loadable captioner with its tokenizer under `captioner/`. Written in a private temp dir on
        this rank's node (under $RAYCAP_SCRATCH if set) and removed: the controller writes the run dir."""
        with tempfile.TemporaryDirectory(prefix=f"raycap-rank{self.rank}-", dir=scratch_dir()) as tmp:
            root = Path(tmp)
            self.engine.save_checkpoint(str(root), tag=tag,
                                        client_state=client_state | {"torch_rng": torch.get_rng_state()})
            if self.rank == 0:
                self.policy.save_pretrained(root / tag / "captioner")
                self.tokenizer.save_pretrained(str(root / tag / "captioner" / "tokenizer"))
            files = {p.relative_to(root / tag).as_posix(): p.read_bytes()
                     for p in sorted((root / tag).rglob("*")) if p.is_file()}
            if (root / "latest").is_file():
                files["latest"] = (root / "latest").read_bytes()
        return files

    def load(self, tag: str, files: dict[str, bytes]) -> dict:
        """Resume from this rank's part of a checkpoint (`save`'s files, sent by the controller), written into a
        private temp dir for DeepSpeed's `load_checkpoint`.

        A run dir is trusted input: `load_checkpoint` unpickles these files (torch.load with pickle), and a
        crafted checkpoint runs code in this actor, so resume only run dirs you or someone you trust wrote."""
        with tempfile.TemporaryDirectory(prefix=f"raycap-rank{self.rank}-", dir=scratch_dir()) as tmp:
            for rel, data in files.items():
                path = Path(tmp) / (rel if rel == "latest" else f"{tag}/{rel}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            loaded, client_state = self.engine.load_checkpoint(tmp, tag=tag)
        if loaded is None:
            raise RuntimeError(f"learner rank {self.rank}: checkpoint {tag} holds no DeepSpeed model states "
                               f"(got {sorted(files)})")
        self.version = int(client_state["version"])
        torch.set_rng_state(client_state["torch_rng"])  # the global RNG too (raycap draws from per-step streams)
        return client_state
