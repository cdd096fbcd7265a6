"""RewardService: the frozen CLIP retriever, the image-embedding cache and distractor sampling, as one actor.

It draws each step's batch and candidates (random and hard kNN), scores the captions of all rollout workers in
one batched call (task reward + optional self-check), and evaluates a published captioner (validation split
during the run, test split once at the end).
"""
from __future__ import annotations

import os
import time

import torch

from raycap.config import RLConfig
from raycap.data.cache import world_image_embeddings
from raycap.models.loading import load_world_dir
from raycap.rl import algorithm
from raycap.runtime import resources
from raycap.runtime.weights import load_flat_weights
from raycap.supervised.captioner import evaluate_captioner


class RewardService:
    def __init__(self, config_json: str):
        self.cfg = RLConfig.model_validate_json(config_json)
        self.threads = resources.apply_threads(self.cfg.threads)  # its CPU share, or `threads`
        self.pw = load_world_dir(self.cfg.world_dir)
        self.images = world_image_embeddings(self.pw.retriever, self.pw.world, "train")
        self.scorer = algorithm.Scorer(self.pw.retriever, self.images, self.pw.tokenizer,
                                       self.pw.captioner.stop_ids, self.cfg)
        self.pw.captioner.set_trainable(self.cfg.train_lm)  # evaluations load the learner's flat weights
        self.pw.captioner.config.max_new_tokens = self.cfg.max_new_tokens

    def pid(self) -> int:
        return os.getpid()

    def image_embeddings(self) -> torch.Tensor:
        return self.images

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.scorer.batch(step)

    def score(self, cands: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, step: int) -> dict:
        t = time.perf_counter()
        s = self.scorer.score(cands, tokens, lengths, step)
        return {"reward": s.reward, "task": s.task, "check": s.check, "accuracy": s.accuracy, "texts": s.texts,
                "score_seconds": time.perf_counter() - t}

    def evaluate(self, weights: list, n: int, split: str = "val") -> dict:
        """World metrics on `split` of the captioner with the given trainable weights (greedy captions)."""
        import ray

        load_flat_weights(self.pw.captioner, ray.get(weights[0]))
        return evaluate_captioner(self.pw.captioner, self.pw.retriever, self.pw.world, split, n, examples=3)
