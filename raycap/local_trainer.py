"""The single-process reference trainer: DiscriTune (REINFORCE + KL guard) or Gumbel CLIP relevance.

It is the definition of what a run computes; the Ray runtime must match it. Nothing here reads the world's
scenes or descriptions: rewards come from the frozen retriever on cached image embeddings (of any image
source: `raycap.inputs`), and the world's scenes are used only by the evaluation (the judge).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from raycap.config import RunConfig
from raycap.inputs import attach_captioner_inputs, check_run_compatible, open_splits, skipped_counts
from raycap.models import lora
from raycap.models.decode import rollout_decoder
from raycap.models.devices import resolve_device
from raycap.models.loading import load_captioner_model
from raycap.models.torch_io import load_tensors
from raycap.roles import build_role_models, optimizer, train_scorer
from raycap.rl import algorithm
from raycap.rl.selection import Selection
from raycap.runlog import CHECKPOINT_MARKERS, check_run_dir, last_checkpoint, record_run_dir, run_updates
from raycap.supervised.captioner import evaluate_images

STATE_FILE = CHECKPOINT_MARKERS["local"]  # "trainer_state.pt"


class LocalTrainer:
    def __init__(self, config: RunConfig, out: Path, log=print, allow_new_config: bool = False, splits=None):
        """`splits`: the run's images already opened (`raycap.inputs.open_splits` for this config's data and
        retriever), as a search hands them to its trials; by default they are opened here."""
        self.cfg, self.out, self.log = config, Path(out), log
        run_dir = check_run_dir(self.out, config, "local", allow_new_config)  # before anything loads
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.models = build_role_models(config, resolve_device(config.runtime.device), reference=True, retriever=True)
        self.device = self.models.device
        self.policy, self.tokenizer = self.models.policy, self.models.tokenizer
        self.reference, self.retriever = self.models.reference, self.models.retriever
        self.decoder = rollout_decoder(self.policy)
        check_run_compatible(self.policy, self.retriever, config)
        self.splits = splits if splits is not None else open_splits(config, self.retriever, log, self.policy)
        # patch tokens, or BLIP's own features (cached, or read per batch)
        attach_captioner_inputs(self.policy, self.splits, self.retriever, config.captioner.vision_features, log)
        self.scorer = train_scorer(self.models, self.splits["train"], config)
        self.opt = optimizer(self.policy, config)
        self.advantages = algorithm.Advantages(config)
        self.step = 0
        self._resume()
        record_run_dir(run_dir)  # written only now that every input has been checked and loaded

    # -- checkpoints ----------------------------------------------------------------------------------
    def _resume(self):
        last = last_checkpoint(self.out, STATE_FILE)
        if last is None:
            return
        state = load_tensors(last / STATE_FILE)
        if "adapted" in state:  # a LoRA run: the saved captioner is merged, its trainable weights are here
            lora.load_trainable(self.policy, state["adapted"])
        else:
            self.policy.load_state_dict(load_captioner_model(last).state_dict())
        self.opt.load_state_dict(state["optimizer"])
        self.advantages.load_state_dict(state["baseline"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resuming from {last} at step {self.step}")

    def save(self, path: Path):
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        state = {"optimizer": self.opt.state_dict(), "baseline": self.advantages.state_dict(), "step": self.step,
                 "torch_rng": torch.get_rng_state()}
        if self.cfg.captioner.lora is not None:
            state["adapted"] = lora.trainable_state(self.policy)
        torch.save(state, path / STATE_FILE)

    # -- one update -----------------------------------------------------------------------------------
    def update(self, step: int) -> dict:
        """One update; its forward passes run in the role's precision, the backward passes and the step outside
        (DiscriTune's over `rl.optimiser.micro_batch` images at a time: `algorithm.reinforce_backward`)."""
        cfg = self.cfg
        _, img, cands = self.scorer.batch(step)
        self.opt.zero_grad(set_to_none=True)
        if cfg.rl.method == "gumbel":
            with self.models.autocast():
                loss, stats = algorithm.gumbel_loss(self.policy, self.reference, self.scorer, img, cands,
                                                    self.tokenizer.eos_token_id, cfg, step)
            algorithm.check_loss(loss, step)
            loss.backward()
        else:
            with self.models.autocast():
                caps = algorithm.rollout(self.policy, img, cfg, step, decoder=self.decoder)
                scores = self.scorer.score(cands, caps.tokens, caps.lengths, step)
                greedy = None
                if cfg.rl.algorithm.baseline == "greedy":
                    g = algorithm.rollout(self.policy, img, cfg, step, greedy=True, decoder=self.decoder)
                    greedy = self.scorer.score(cands, g.tokens, g.lengths, step).reward
            r = scores.reward
            advantages = self.advantages(r, greedy, scores.verified)
            loss, stats = algorithm.reinforce_backward(self.policy, self.reference, img, caps.tokens,
                                                       caps.lengths, advantages, cfg, step, torch.Tensor.backward,
                                                       self.models.autocast, rollout_logprobs=caps.logprobs)
            stats |= algorithm.summarise(scores, caps.lengths)
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        # one process: the decoder is the policy, so its "sync" is the optimizer step
        changed = algorithm.changes_weights(self.policy, self.opt.step)
        return stats | {"loss": float(loss.detach()), "sync_changed": float(changed)}

    # -- the run --------------------------------------------------------------------------------------
    def evaluate(self, split: str = "val", decoding: str | None = None) -> dict:
        """Metrics on `split`, decoded as `decoding` says (default: greedy, and `eval.decoding` on test)."""
        s = self.splits[split]
        mode = decoding or (self.cfg.eval.decoding if split == "test" else "greedy")
        with self.models.autocast():
            return evaluate_images(self.policy, self.tokenizer, self.retriever, s.source, s.embeddings,
                                   self.cfg.eval.images, examples=self.cfg.eval.examples, inputs=s.inputs,
                                   mode=mode, num_beams=self.cfg.eval.num_beams,
                                   selection=Selection.from_config(self.cfg),
                                   pool=self.splits["train"].embeddings, batch_size=self.cfg.eval.batch_size,
                                   keep_captions=split == "test")

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
