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
from raycap.inputs import SplitImages, load_captioner, load_retriever
from raycap.rl import algorithm
from raycap.runtime import resources
from raycap.runtime.weights import load_flat_weights
from raycap.supervised.captioner import evaluate_images


class RewardService:
    def __init__(self, config_json: str, splits: dict[str, SplitImages]):
        """`splits`: train/val/test images and embeddings, opened by the controller (`raycap.inputs`)."""
        self.cfg = RunConfig.model_validate_json(config_json)
        self.threads = resources.apply_threads(self.cfg.threads)  # its CPU share, or `threads`
        self.retriever = load_retriever(self.cfg.retriever)
        self.captioner, self.tokenizer = load_captioner(self.cfg.captioner.path)
        self.splits = splits
        self.images = splits["train"].embeddings
        self.scorer = algorithm.Scorer(self.retriever, self.images, self.tokenizer, self.captioner.stop_ids, self.cfg,
                                       inputs=splits["train"].inputs)
        self.captioner.set_trainable(self.cfg.rl.train_lm)  # evaluations load the learner's flat weights
        self.captioner.config.max_new_tokens = self.cfg.rl.max_new_tokens

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
        """Metrics on `split` of the captioner with the given trainable weights (greedy captions; the test split
        decodes as `eval.decoding` says)."""
        import ray

        load_flat_weights(self.captioner, ray.get(weights[0]))
        s = self.splits[split]
        mode = self.cfg.eval.decoding if split == "test" else "greedy"
        return evaluate_images(self.captioner, self.tokenizer, self.retriever, s.source, s.embeddings, n,
                               examples=self.cfg.eval.examples, inputs=s.inputs, mode=mode,
                               num_beams=self.cfg.eval.num_beams, selection=self.cfg.selection(),
                               pool=self.splits["train"].embeddings, batch_size=self.cfg.eval.batch_size)
