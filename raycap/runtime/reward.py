"""RewardService: the frozen CLIP retriever, the image-embedding cache and distractor sampling, as one actor.

It draws each step's batch and candidates (random and hard kNN), scores the captions of all rollout workers in
one batched call (task reward + optional self-check), and evaluates a published captioner (validation split
during the run, test split once at the end).
"""
from __future__ import annotations

import os
import time

import torch

from raycap.config import RunConfig
from raycap.inputs import SplitImages
from raycap.rl import algorithm
from raycap.rl.selection import Selection
from raycap.roles import build_role_models, train_scorer
from raycap.runtime import resources
from raycap.runtime.weights import load_flat_weights
from raycap.supervised.captioner import evaluate_images


class SplitsHolder:
    """Holds [the reference to] the run's splits for the reward service, which fetches them by this actor's name
    when it starts and again when Ray restarts it. (A reference among an actor's constructor arguments, even nested,
    is a creation-task dependency Ray does not keep for a restart: ray-project/ray#53727, and Ray logs an error
    for every such actor with restarts.)"""

    def __init__(self):
        self.refs: list | None = None

    def hold(self, refs: list) -> None:
        self.refs = refs

    def get(self) -> list:
        return self.refs


class RewardService:
    def __init__(self, config_json: str, splits_holder: str):
        """`splits_holder`: the name of the `SplitsHolder` actor that holds [a reference to] the train/val/test
        images and embeddings the controller opened (`raycap.inputs.SplitImages` by split), fetched here, and
        again on a restart."""
        import ray

        self.cfg = RunConfig.model_validate_json(config_json)
        self.threads = resources.apply_threads(self.cfg.threads)  # its CPU share, or `threads`
        # the retriever scores on the role's device; the captioner (evaluations load the learner's weights into
        # it) has the learner's trainable set and adapters
        self.models = build_role_models(self.cfg, resources.role_device(self.cfg.runtime.device), retriever=True)
        self.retriever, self.captioner, self.tokenizer = self.models.retriever, self.models.policy, self.models.tokenizer
        self.device = self.models.device
        try:
            holder = ray.get_actor(splits_holder)
        except ValueError:
            raise RuntimeError(f"the reward service cannot find {splits_holder!r}, the actor holding the run's "
                               "splits (it lives beside the run's driver, which has stopped or lost its node)") from None
        refs = ray.get(holder.get.remote())
        self.splits: dict[str, SplitImages] = ray.get(refs[0])  # on the CPU, as the controller opened them
        self.scorer = train_scorer(self.models, self.splits["train"], self.cfg)

    def pid(self) -> int:
        return os.getpid()

    def image_embeddings(self) -> torch.Tensor:
        return self.splits["train"].embeddings

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's (image indices, captioner inputs, candidates), on the CPU for the controller."""
        return tuple(t.cpu() for t in self.scorer.batch(step))

    def score(self, cands: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
              step: int) -> tuple[algorithm.Scores, float]:
        """The captions' scores on the CPU, and the seconds they took."""
        t = time.perf_counter()
        with self.models.autocast():
            s = self.scorer.score(cands, tokens, lengths, step)
        return s.cpu(), time.perf_counter() - t

    def evaluate(self, weights: list, n: int, split: str = "val", decoding: str | None = None) -> dict:
        """Metrics on `split` of the captioner with the given trainable weights, decoded as `decoding` says
        (default: greedy, and `eval.decoding` on the test split)."""
        import ray

        load_flat_weights(self.captioner, ray.get(weights[0]))
        s = self.splits[split]
        mode = decoding or (self.cfg.eval.decoding if split == "test" else "greedy")
        with self.models.autocast():
            return evaluate_images(self.captioner, self.tokenizer, self.retriever, s.source, s.embeddings, n,
                                   examples=self.cfg.eval.examples, inputs=s.inputs, mode=mode,
                                   num_beams=self.cfg.eval.num_beams, selection=Selection.from_config(self.cfg),
                                   pool=self.splits["train"].embeddings, batch_size=self.cfg.eval.batch_size,
                                   keep_captions=split == "test")
