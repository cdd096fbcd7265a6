"""The single-process reference trainer: DiscriTune (REINFORCE + KL guard) or Gumbel CLIP relevance.

It is the definition of what a run computes; the Ray runtime must match it. Nothing here reads the world's
scenes or descriptions: rewards come from the frozen retriever on cached image embeddings (of any image
source: `raycap.inputs`), and the world's scenes are used only by the evaluation (the judge).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from raycap.config import RunConfig
from raycap.inputs import (
    attach_captioner_inputs,
    check_run_compatible,
    load_captioner,
    load_retriever,
    open_splits,
    skipped_counts,
)
from raycap.models.loading import load_captioner_model
from raycap.rl import algorithm
from raycap.runlog import CHECKPOINT_MARKERS, last_checkpoint, prepare_run_dir, run_updates
from raycap.supervised.captioner import evaluate_images

STATE_FILE = CHECKPOINT_MARKERS["local"]  # "trainer_state.pt"


def summarise(scores: algorithm.Scores, lengths: torch.Tensor) -> dict:
    """The step's reward statistics, as logged by both runtimes."""
    out = {"reward_mean": float(scores.reward.mean()), "reward_std": float(scores.reward.std()),
           "train_p_at_1": float(scores.accuracy.mean()), "caption_length": float(lengths.float().mean()),
           "example": scores.texts[0]}
    if scores.check is not None:
        out |= {"task_reward": float(scores.task.mean()), "self_check": float(scores.check.mean())}
    return out


class LocalTrainer:
    def __init__(self, config: RunConfig, out: Path, log=print, allow_new_config: bool = False, splits=None):
        """`splits`: the run's images already opened (`raycap.inputs.open_splits` for this config's data and
        retriever), as a search hands them to its trials; by default they are opened here."""
        self.cfg, self.out, self.log = config, Path(out), log
        prepare_run_dir(self.out, config, "local", allow_new_config)  # before anything loads or is written
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.policy, self.tokenizer = load_captioner(config.captioner.path)
        self.policy.config.max_new_tokens = config.rl.max_new_tokens
        self.policy.set_trainable(config.rl.train_lm)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.retriever = load_retriever(config.retriever)
        check_run_compatible(self.policy, self.retriever, config)
        self.splits = splits if splits is not None else open_splits(config, self.retriever, log)
        attach_captioner_inputs(self.policy, self.splits, self.retriever, log)  # patch tokens, BLIP's features
        self.images = self.splits["train"].embeddings
        self.scorer = algorithm.Scorer(self.retriever, self.images, self.tokenizer, self.policy.stop_ids, config,
                                       inputs=self.splits["train"].inputs)
        self.opt = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad], lr=config.rl.lr)
        self.advantages = algorithm.Advantages(config)
        self.step = 0
        self._resume()

    # -- checkpoints ----------------------------------------------------------------------------------
    def _resume(self):
        last = last_checkpoint(self.out, STATE_FILE)
        if last is None:
            return
        self.policy.load_state_dict(load_captioner_model(last).state_dict())
        state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.advantages.load_state_dict(state["baseline"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resuming from {last} at step {self.step}")

    def save(self, path: Path):
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        torch.save({"optimizer": self.opt.state_dict(), "baseline": self.advantages.state_dict(), "step": self.step,
                    "torch_rng": torch.get_rng_state()}, path / STATE_FILE)

    # -- one update -----------------------------------------------------------------------------------
    def update(self, step: int) -> dict:
        cfg = self.cfg
        _, img, cands = self.scorer.batch(step)
        if cfg.rl.method == "gumbel":
            loss, stats = algorithm.gumbel_loss(self.policy, self.reference, self.scorer, img, cands,
                                                self.tokenizer.eos_token_id, cfg, step)
            self._step(loss)
            return stats | {"loss": float(loss.detach())}
        caps = algorithm.rollout(self.policy, img, cfg, step)
        scores = self.scorer.score(cands, caps.tokens, caps.lengths, step)
        greedy = None
        if cfg.rl.baseline == "greedy":
            g = algorithm.rollout(self.policy, img, cfg, step, greedy=True)
            greedy = self.scorer.score(cands, g.tokens, g.lengths, step).reward
        r = scores.reward
        advantages = r - self.advantages.baseline(r, greedy)
        loss, stats = algorithm.reinforce_loss(self.policy, self.reference, img, caps.tokens, caps.lengths,
                                               advantages, cfg)
        self._step(loss)
        return stats | summarise(scores, caps.lengths) | {"loss": float(loss.detach())}

    def _step(self, loss):
        algorithm.check_loss(loss, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()

    # -- the run --------------------------------------------------------------------------------------
    def evaluate(self, split: str = "val") -> dict:
        s = self.splits[split]
        mode = self.cfg.eval.decoding if split == "test" else "greedy"
        return evaluate_images(self.policy, self.tokenizer, self.retriever, s.source, s.embeddings,
                               self.cfg.eval.images, examples=self.cfg.eval.examples, inputs=s.inputs, mode=mode,
                               num_beams=self.cfg.eval.num_beams, selection=self.cfg.selection(),
                               pool=self.splits["train"].embeddings, batch_size=self.cfg.eval.batch_size)

    def fit(self, on_eval=None, test_at_end: bool = True) -> dict:
        """The run (resumed from its last checkpoint); `on_eval` and `test_at_end` as in `runlog.run_updates`."""
        def update(step):
            record = self.update(step)
            self.step = step + 1
            return record

        def checkpoint(step):
            self.save(self.out / "checkpoints" / f"step-{step}")

        final = run_updates(self.cfg, self.out, self.step, update, self.evaluate, checkpoint, self.log,
                            skipped=skipped_counts(self.splits), on_eval=on_eval, test_at_end=test_at_end)
        self.save(self.out / "final")
        (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
        return final
