"""The controller: one process that runs the algorithm loop over actor groups (verl's single controller).

    batch -> rollouts (RolloutWorker shards) -> rewards (RewardService) -> advantages (here)
          -> learner update (DeepSpeed ranks) -> publish weights -> metrics / eval / checkpoint

It computes exactly what `raycap.local_trainer.LocalTrainer` computes (the same `raycap.rl.algorithm`
functions, the same seeded random streams); what Ray adds is placement, parallel shards, weight movement,
restarts of crashed actors and the dashboard metrics.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raycap.config import RunConfig
from raycap.inputs import (
    attach_captioner_inputs,
    check_run_compatible,
    load_captioner,
    load_retriever,
    open_splits,
    skipped_counts,
)
from raycap.models.torch_io import load_tensors
from raycap.rl import algorithm
from raycap.runlog import CHECKPOINT_MARKERS, check_run_dir, last_checkpoint, record_run_dir, run_updates
from raycap.runtime import resources
from raycap.runtime.learner import Learner
from raycap.runtime.metrics import DashboardMetrics
from raycap.runtime.reward import RewardService, SplitsHolder
from raycap.runtime.rollout import RolloutWorker, StaleWeights

CONTROLLER_STATE = CHECKPOINT_MARKERS["ray"]  # "controller.pt", written last


def shards(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Contiguous row shards of near-equal size (the first ones one row longer)."""
    return list(torch.tensor_split(x, n))


def concat_captions(parts: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shards' (tokens, lengths, behaviour log-probs), padded to the longest caption."""
    T = max(p["tokens"].shape[1] for p in parts)

    def cat(key, value):
        return torch.cat([torch.nn.functional.pad(p[key], (0, T - p[key].shape[1]), value=value) for p in parts])

    return cat("tokens", pad_id), torch.cat([p["lengths"] for p in parts]), cat("logprobs", 0.0)


def combine_stats(stats: list[dict]) -> dict:
    """The learner ranks' float statistics of one update: the max over ranks of a `*_max`, else the mean (the
    ranks' shards are equal)."""
    def combine(k):
        values = [s[k] for s in stats]
        return max(values) if k.endswith("_max") else sum(values) / len(values)

    return {k: combine(k) for k in stats[0] if isinstance(stats[0][k], float) and all(k in s for s in stats)}


class Controller:
    def __init__(self, config: RunConfig, out: Path, log=print, allow_new_config: bool = False, splits=None):
        """`splits`: the run's images already opened (as a search hands them to its trials); by default they
        are opened here. Inside a placement group (a trial of `raycap.tune`) the actors take its bundles after
        the first (the trial's own) instead of reserving a group of their own."""
        self.cfg, self.out, self.log = config, Path(out), log
        rt = config.runtime
        if not (rt.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
            resources.check_local_gpus(rt)  # before a local Ray starts: its roles' GPUs must exist here
        run_dir = check_run_dir(self.out, config, "ray", allow_new_config)  # before anything loads
        captioner = load_captioner(config.captioner.path)[0]  # bad dirs and mismatches fail here, not in actors
        retriever = load_retriever(config.retriever)
        check_run_compatible(captioner, retriever, config)
        self.pad_id = captioner.config.pad_token_id
        self.owns_ray, self.dashboard_url = resources.start_ray(rt)
        if self.dashboard_url:
            for line in dashboard_lines(self.dashboard_url):
                log(line)
        # the images and their embeddings (the cache's Ray Data build has the cluster before the actors hold it);
        # the reward service gets them through the object store
        self.splits = splits if splits is not None else open_splits(config, retriever, log, captioner)
        # patch tokens, or BLIP's own features (cached, or read per batch)
        attach_captioner_inputs(captioner, self.splits, retriever, config.captioner.vision_features, log)
        del retriever, captioner
        self.pg, first = resources.reserve(rt)
        self.owns_pg = first == 0
        roles = resources.Roles.of(rt)
        cfg_json = config.model_dump_json()
        threads = config.threads  # None: each actor gets its CPU share (resources.actor_threads)
        opts = {"max_restarts": rt.max_restarts, "max_task_retries": rt.max_restarts}
        # The splits reach the reward service through a named holder actor it reads when it starts and restarts:
        # this controller owns the object and holds it for the run (no reference among the constructor's
        # arguments, which Ray does not keep for a restart: ray-project/ray#53727)
        self.splits_ref = ray.put(self.splits)
        holder_name = f"raycap-splits-{uuid.uuid4().hex}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.splits_holder = ray.remote(SplitsHolder).options(  # beside the splits' primary copy (ray.put)
            name=holder_name, num_cpus=0, scheduling_strategy=here).remote()
        ray.get(self.splits_holder.hold.remote([self.splits_ref]))
        self.reward = ray.remote(RewardService).options(
            **resources.in_bundle(self.pg, first + roles.learner + roles.rollout, rt.cpus_per_reward,
                                 rt.gpus_per_reward, threads),
            **opts).remote(cfg_json, holder_name)
        images = self.reward.image_embeddings.remote() if config.rl.method == "gumbel" else None
        self.learners = [ray.remote(Learner).options(
            **resources.in_bundle(self.pg, first + i, rt.cpus_per_learner, rt.gpus_per_learner, threads)
        ).remote(cfg_json, i)
            for i in range(roles.learner)]
        addr, port = ray.get(self.learners[0].address.remote())
        ray.get([lr.setup.remote(addr, port, images) for lr in self.learners])
        self.rollouts = [ray.remote(RolloutWorker).options(
            **resources.in_bundle(self.pg, first + roles.learner + i, rt.cpus_per_rollout, rt.gpus_per_rollout,
                                  threads),
            **opts).remote(cfg_json, i) for i in range(roles.rollout)]
        self.decoders = self.learners if rt.weight_sync == "colocated" else self.rollouts
        self.pids = ray.get([a.pid.remote() for a in self.decoders])
        if rt.weight_sync == "nccl":
            self._join_broadcast()
        self.metrics = DashboardMetrics(self.out.name)
        self.advantages = algorithm.Advantages(config)
        self.step, self.version, self.weights, self.restarts = 0, 0, None, 0
        self._next_batch: dict[int, ray.ObjectRef] = {}
        self._submitted: dict[ray.ObjectRef, tuple] = {}  # each rollout ref's (worker, step, shard, greedy)
        self._resume()
        record_run_dir(run_dir)  # written only now that every input, and the cluster's resources, have been checked

    # -- weights ----------------------------------------------------------------------------------------
    def _join_broadcast(self):
        """Form the broadcast group: learner rank 0 starts it (dropping an earlier one), every worker (re)joins."""
        rt = self.cfg.runtime
        world = 1 + len(self.rollouts)
        host, port = ray.get(self.learners[0].start_broadcast.remote(rt.collective_backend, world))
        ray.get([w.join_broadcast.remote(rt.collective_backend, host, port, i + 1, world)
                 for i, w in enumerate(self.rollouts)])

    def publish(self) -> None:
        """Move the learner's weights (version `self.version`) to the rollouts outside an update (on resume);
        after each update `learn` does it."""
        mode = self.cfg.runtime.weight_sync
        if mode == "object_store":
            self.weights = [self.learners[0].publish.remote()]
        elif mode == "nccl":
            self._broadcast()

    def _broadcast(self) -> float:
        """The learner's weights (version `self.version`) to every rollout worker, in a group re-formed first if a
        worker lost it; returns the share of workers whose weights the broadcast changed."""
        self._regroup()
        done = ray.get([self.learners[0].send_broadcast.remote()]
                       + [w.receive_broadcast.remote(self.version) for w in self.rollouts])
        return sum(done[1:]) / len(self.rollouts)

    def _regroup(self) -> bool:
        """Re-form the broadcast group when a rollout worker is in none (Ray restarted it: a broadcast would wait
        for its rank until the group's timeout). Returns whether it did."""
        if all(ray.get([w.has_group.remote() for w in self.rollouts])):
            return False
        self.log("a rollout worker lost its broadcast group (restarted): re-forming the group")
        self._join_broadcast()
        return True

    def _catch_up(self) -> None:
        """Before rollouts under weight_sync=nccl: a restarted worker rejoins and gets the current weights."""
        if self._regroup():
            self._broadcast()

    # -- one step ---------------------------------------------------------------------------------------
    def submit_rollouts(self, step: int, img: torch.Tensor, greedy: bool = False) -> list:
        if self.cfg.runtime.weight_sync == "nccl":
            self._catch_up()
        refs = []
        for i, (w, part) in enumerate(zip(self.decoders, shards(img, len(self.decoders)))):
            refs.append(w.rollout.remote(step, part, self.version, self.weights, greedy))
            self._submitted[refs[-1]] = (i, step, part, greedy)
        return refs

    def _fetch(self, ref) -> dict:
        """One shard's rollouts. Under weight_sync=nccl a worker that Ray restarted while it decoded comes back
        with no weights (`StaleWeights`): it rejoins the broadcast, gets the current weights, and decodes again."""
        i, step, part, greedy = self._submitted.pop(ref)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if self.cfg.runtime.weight_sync != "nccl" or not isinstance(getattr(e, "cause", None), StaleWeights):
                raise
            self.log(f"rollout worker {i} was restarted while it decoded: rejoining the broadcast, decoding again")
            self._catch_up()
            return ray.get(self.decoders[i].rollout.remote(step, part, self.version, None, greedy))

    def collect(self, refs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        parts = [self._fetch(ref) for ref in refs]
        for i, p in enumerate(parts):
            if p["pid"] != self.pids[i]:  # the actor was restarted by Ray and the task retried
                self.pids[i] = p["pid"]
                self.restarts += 1
                self.metrics.restarted()
                self.log(f"rollout worker {i} was restarted (pid {p['pid']}); its shard was retried")
        tokens, lengths, logprobs = concat_captions(parts, self.pad_id)
        info = {"rollout_version": min(p["version"] for p in parts),
                "rollout_sync_seconds": max(p["sync_seconds"] for p in parts),
                "decode_seconds": max(p["decode_seconds"] for p in parts)}
        loaded = [p["sync_changed"] for p in parts if p.get("sync_changed") is not None]
        if loaded:  # weight_sync=object_store: the workers that loaded new weights for these rollouts
            info["sync_changed"] = sum(loaded) / len(loaded)
        return tokens, lengths, logprobs, info

    def learn(self, step: int, img, tokens, lengths, advantages, cands=None, behaviour_logprobs=None,
              rollout_logprobs=None) -> dict:
        """The learner ranks' update on their shards, then the new weights to the rollouts (version + 1).
        `behaviour_logprobs` are given when an older policy sampled the captions (importance weighting);
        `rollout_logprobs`, the rollouts' own log-probs, always (the `logprob_drift` statistics)."""
        n, mode = len(self.learners), self.cfg.runtime.weight_sync
        rows = [shards(x, n) if x is not None else [None] * n
                for x in (img, tokens, lengths, advantages, cands, behaviour_logprobs, rollout_logprobs)]
        refs = [lr.update.options(num_returns=2).remote(step, *(r[i] for r in rows[:5]),
                                                        publish=i == 0 and mode == "object_store",
                                                        behaviour_logprobs=rows[5][i], rollout_logprobs=rows[6][i])
                for i, lr in enumerate(self.learners)]
        stats = ray.get([r[0] for r in refs])
        self.version += 1
        t = time.perf_counter()
        changed = None
        if mode == "object_store":
            self.weights = [refs[0][1]]  # already in the object store; workers fetch it when they decode
        elif mode == "nccl":
            changed = self._broadcast()
        out = combine_stats(stats)
        if changed is not None:
            out["sync_changed"] = changed
        out["learner_seconds"] = max(s["learner_seconds"] for s in stats)
        moved = 0.0 if mode == "colocated" else time.perf_counter() - t  # colocated: nothing moves
        out["weight_sync_seconds"] = moved + stats[0].get("publish_seconds", 0.0)
        return out

    def _batch(self, step: int):
        ref = self._next_batch.pop(step, None) or self.reward.batch.remote(step)
        return ray.get(ref)

    def run_step(self, step: int, pending: list | None) -> tuple[dict, list | None]:
        """One update. `pending` holds this step's rollouts if they were started early (max_policy_lag=1)."""
        cfg = self.cfg
        t = time.perf_counter()
        _, img, cands = self._batch(step)
        if step + 1 < cfg.rl.steps:  # drawn by the reward service while this step runs
            self._next_batch[step + 1] = self.reward.batch.remote(step + 1)
        if cfg.rl.method == "gumbel":
            record = self.learn(step, img, None, None, None, cands)
            return record | {"step_seconds": time.perf_counter() - t}, None
        refs = pending or self.submit_rollouts(step, img)
        greedy_refs = self.submit_rollouts(step, img, greedy=True) if cfg.rl.algorithm.baseline == "greedy" else None
        tokens, lengths, behaviour_logprobs, info = self.collect(refs)
        scores, score_seconds = ray.get(self.reward.score.remote(cands, tokens, lengths, step))
        greedy = None
        if greedy_refs:
            g_tokens, g_lengths, _, _ = self.collect(greedy_refs)
            greedy = ray.get(self.reward.score.remote(cands, g_tokens, g_lengths, step))[0].reward
        advantages = self.advantages(scores.reward, greedy, scores.verified)
        nxt = None
        if cfg.runtime.max_policy_lag >= 1 and step + 1 < cfg.rl.steps:  # decode t+1 while the learner updates t
            nxt = self.submit_rollouts(step + 1, ray.get(self._next_batch[step + 1])[1])
        policy_lag = self.version - info["rollout_version"]
        record = self.learn(step, img, tokens, lengths, advantages,
                            behaviour_logprobs=behaviour_logprobs if policy_lag else None,
                            rollout_logprobs=behaviour_logprobs)
        record |= algorithm.summarise(scores, lengths) | {
            "policy_lag": float(policy_lag), "decode_seconds": info["decode_seconds"],
            "score_seconds": score_seconds, "actor_restarts": self.restarts}
        record["weight_sync_seconds"] += info["rollout_sync_seconds"]
        if "sync_changed" in info:  # object_store: the sync these rollouts loaded
            record["sync_changed"] = info["sync_changed"]
        record["step_seconds"] = time.perf_counter() - t
        record["captions_per_second"] = len(tokens) / record["step_seconds"]
        return record, nxt

    # -- evaluation and checkpoints -----------------------------------------------------------------------
    def evaluate(self, split: str = "val", decoding: str | None = None) -> dict:
        """The reward service's evaluation of the current policy (`RewardService.evaluate`)."""
        weights = self.weights if self.cfg.runtime.weight_sync == "object_store" and self.version else None
        if weights is None:
            weights = [self.learners[0].publish.remote()]
        return ray.get(self.reward.evaluate.remote(weights, self.cfg.eval.images, split, decoding))

    def save(self, tag: str) -> None:
        """`RUN/checkpoints/<tag>/`: every learner rank's DeepSpeed files and rank 0's loadable captioner/, which
        the ranks write on their own nodes and return as bytes (the head and the workers need not share a
        disk: the controller is the only writer of the run dir), then controller.pt, written last."""
        directory = self.out / "checkpoints" / tag
        state = {"step": self.step, "version": self.version}
        parts = ray.get([lr.save.remote(tag, state) for lr in self.learners])
        if directory.exists():  # a partial checkpoint of a killed run (no controller.pt): start it afresh
            shutil.rmtree(directory)
        for files in parts:
            write_files(directory, files)
        tmp = directory / (CONTROLLER_STATE + ".tmp")
        torch.save({"step": self.step, "version": self.version, "baseline": self.advantages.state_dict(),
                    "restarts": self.restarts}, tmp)
        tmp.replace(directory / CONTROLLER_STATE)

    def _resume(self) -> None:
        last = last_checkpoint(self.out, CONTROLLER_STATE)
        if last is None:
            return
        ray.get([lr.load.remote(last.name, rank_files(last, rank)) for rank, lr in enumerate(self.learners)])
        state = load_tensors(last / CONTROLLER_STATE)
        self.step, self.version, self.restarts = int(state["step"]), int(state["version"]), int(state["restarts"])
        self.advantages.load_state_dict(state["baseline"])
        self.publish()
        self.log(f"resuming from {last} at step {self.step}")

    # -- the run ----------------------------------------------------------------------------------------
    def fit(self, on_eval=None, test_at_end: bool = True) -> dict:
        """The run (resumed from its last checkpoint); `on_eval` and `test_at_end` as in `runlog.run_updates`."""
        state = {"pending": None}

        def update(step):
            record, state["pending"] = self.run_step(step, state["pending"])
            self.step = step + 1
            return record

        final = run_updates(self.cfg, self.out, self.step, update, self.evaluate,
                            lambda step: self.save(f"step-{step}"), self.log, self.metrics.record,
                            skipped=skipped_counts(self.splits), on_eval=on_eval, test_at_end=test_at_end)
        _copy_tree(self.out / "checkpoints" / f"step-{self.step}" / "captioner", self.out / "final")
        final["actor_restarts"] = self.restarts
        (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
        return final

    def shutdown(self) -> None:
        for a in [*self.rollouts, *self.learners, self.reward, self.splits_holder]:
            ray.kill(a)
        if self.owns_pg:  # a trial's group belongs to Tune
            ray.util.remove_placement_group(self.pg)
        if self.owns_ray:
            ray.shutdown()


def dashboard_lines(url: str) -> list[str]:
    """How to open the dashboard of the Ray this run started, and what its Metrics tab needs."""
    return [f"Ray dashboard: http://{url}  (actors under Cluster > Actors; it asks for this cluster's token: "
            "`ray get-auth-token` prints it)",
            "  its Metrics tab (raycap_* metrics) needs Prometheus and Grafana: `ray metrics launch-prometheus`"]


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write {relative path: bytes} under `directory`."""
    for rel, data in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


_ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_")


def rank_files(checkpoint: Path, rank: int) -> dict[str, bytes]:
    """What learner `rank` loads from a checkpoint dir: the DeepSpeed files (model states, `latest`) and its own
    ZeRO optimizer shard, not the other ranks' shards, the captioner/ copy or the controller's state."""
    out = {}
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        if not path.is_file() or rel.startswith("captioner/") or rel.startswith(CONTROLLER_STATE):
            continue
        shard = _ZERO_SHARD.search(path.name)
        if shard and int(shard.group(1)) != rank:
            continue
        out[rel] = path.read_bytes()
    return out


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
