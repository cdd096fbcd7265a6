"""The single-process reference trainer: DiscriTune (REINFORCE + KL guard) or Gumbel CLIP relevance.

It is the definition of what a run computes; the Ray runtime must match it. Nothing here reads the world's
scenes or descriptions: rewards come from the frozen retriever on cached image embeddings, and the world is
used only by the evaluation (the judge).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from raycap.config import RLConfig
from raycap.data import distractors
from raycap.data.cache import world_image_embeddings
from raycap.models.clipcap import ClipCap
from raycap.models.loading import PretrainedWorld, load_world_dir
from raycap.models.tokenizers import decode
from raycap.rl import baselines, losses, rewards
from raycap.rl.gumbel import gumbel_decode
from raycap.supervised.captioner import evaluate_captioner

STATE_FILE = "trainer_state.pt"


class LocalTrainer:
    def __init__(self, config: RLConfig, out: Path, log=print):
        self.cfg, self.out, self.log = config, Path(out), log
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.pw: PretrainedWorld = load_world_dir(config.world_dir)
        self.policy = self.pw.captioner
        self.policy.config.max_new_tokens = config.max_new_tokens
        if not config.train_lm:
            self.policy.lm.requires_grad_(False)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.retriever = self.pw.retriever
        self.images = world_image_embeddings(self.retriever, self.pw.world, "train")
        self.opt = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad], lr=config.lr)
        self.running = baselines.RunningMean(momentum=config.baseline_momentum)
        self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(config.model_dump_json(indent=2))
        self._resume()

    # -- checkpoints ----------------------------------------------------------------------------------
    def _resume(self):
        ckpts = sorted((self.out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            return
        last = ckpts[-1]
        self.policy.load_state_dict(ClipCap.from_pretrained(last).state_dict())
        state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.running.load_state_dict(state["baseline"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resuming from {last} at step {self.step}")

    def save(self, path: Path):
        self.policy.save_pretrained(path)
        self.pw.tokenizer.save_pretrained(str(path / "tokenizer"))
        torch.save({"optimizer": self.opt.state_dict(), "baseline": self.running.state_dict(), "step": self.step,
                    "torch_rng": torch.get_rng_state()}, path / STATE_FILE)

    # -- one update -----------------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.cfg.seed, step])
        return torch.from_numpy(rng.choice(len(self.images), size=self.cfg.batch_size, replace=False))

    def _encode(self, tokens, lengths) -> tuple[torch.Tensor, list[str]]:
        texts = decode(self.pw.tokenizer, tokens, lengths, self.policy.stop_ids)
        with torch.no_grad():
            return self.retriever.encode_captions(texts), texts

    def _reward(self, text_emb, cands, step) -> torch.Tensor:
        return rewards.compute(self.cfg.reward, text_emb, self.images, cands, float(self.retriever.logit_scale),
                               batch=step)

    def update(self, step: int) -> dict:
        cfg = self.cfg
        idx = self.batch(step)
        img = self.images[idx]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        cands = distractors.candidates(idx, self.images, cfg.hard_distractors, cfg.near_duplicate,
                                       cfg.num_candidates, generator=gen)
        self.policy.eval()  # no dropout in RL: the learner scores exactly the policy that sampled
        if cfg.method == "gumbel":
            return self._gumbel_update(img, cands, step)
        n = cfg.num_samples
        caps = self.policy.generate(img, mode=cfg.rollout, temperature=cfg.temperature, num_samples=n,
                                    generator=gen)
        text_emb, texts = self._encode(caps.tokens, caps.lengths)
        cands_n = cands.repeat_interleave(n, dim=0)
        r = self._reward(text_emb, cands_n, step)
        if cfg.baseline == "none":
            b = torch.zeros_like(r)
        elif cfg.baseline == "mean":
            b = self.running(r)
        elif cfg.baseline == "loo":
            b = baselines.leave_one_out(r, n)
        else:
            greedy = self.policy.generate(img, mode="greedy")
            b = baselines.self_critical(self._reward(self._encode(greedy.tokens, greedy.lengths)[0], cands, step), n)
        logits = self.policy.logits(img, caps.tokens)
        token_lp = losses.token_logprobs(logits, caps.tokens)
        pg = losses.reinforce(token_lp, caps.lengths, r - b, cfg.length_normalise)
        kl = self._kl(img, caps.tokens, caps.lengths, logits, token_lp)
        loss = pg + cfg.kl_coef * kl.mean()
        ent = losses.entropy(logits, caps.lengths)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent.mean()
        self._step(loss)
        acc = rewards.accuracy(text_emb, self.images, cands_n)
        kl = kl.detach()
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "advantage_std": float((r - b).std()),
                "kl": float(kl.mean()), "entropy": float(ent.detach().mean()), "train_p_at_1": float(acc.mean()),
                "caption_length": float(caps.lengths.float().mean()), "loss": float(loss.detach()),
                "example": texts[0]}

    def _kl(self, img, tokens, lengths, logits, token_lp) -> torch.Tensor:
        with torch.no_grad():
            ref_logits = self.reference.logits(img, tokens)
        if self.cfg.kl_estimator == "full":
            return losses.kl_full(logits, ref_logits, lengths)
        return losses.kl_sampled(token_lp, losses.token_logprobs(ref_logits, tokens), lengths)

    def _gumbel_update(self, img, cands, step) -> dict:
        cfg = self.cfg
        soft = gumbel_decode(self.policy, img, self.pw.tokenizer.eos_token_id, tau=cfg.gumbel_tau)
        text_emb = self.retriever.encode_soft_tokens(soft.probs, soft.lengths - 1)
        if cfg.gumbel_loss == "relevance":
            task = losses.clip_relevance(text_emb, img)
        else:
            task = -rewards.discriminative(text_emb, self.images, cands, self.retriever.logit_scale).mean()
        T = soft.logits.shape[1]
        kl_len = soft.lengths.clamp(max=T)
        tokens = soft.tokens[:, :T]
        kl = self._kl(img, tokens, kl_len, soft.logits, losses.token_logprobs(soft.logits, tokens))
        loss = task + cfg.kl_coef * kl.mean()
        self._step(loss)
        with torch.no_grad():
            acc = rewards.accuracy(text_emb, self.images, cands)
            cos = (text_emb * img).sum(-1)
        return {"loss": float(loss.detach()), "task_loss": float(task.detach()), "clip_cos": float(cos.mean()),
                "kl": float(kl.detach().mean()),
                "train_p_at_1": float(acc.mean()), "caption_length": float(soft.lengths.float().mean())}

    def _step(self, loss):
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}: refusing to update")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()

    # -- the run --------------------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> dict:
        res = evaluate_captioner(self.policy, self.retriever, self.pw.world, "test", n or self.cfg.eval_images)
        return {k: v for k, v in res.items() if k != "examples"} | {"examples": res["examples"][:3]}

    def fit(self) -> dict:
        cfg = self.cfg
        writer = SummaryWriter(str(self.out / "tensorboard"))
        metrics_file = (self.out / "metrics.jsonl").open("a")
        if self.step == 0:
            initial = self.evaluate()
            metrics_file.write(json.dumps({"step": 0, "eval": initial}) + "\n")
            self.log(f"step 0 (supervised captioner): P@1 {initial['p_at_1']:.3f}, wellformed "
                     f"{initial['wellformed']:.3f}, faithful {initial['faithful']:.3f}")
        t0, start = time.time(), self.step
        bar = tqdm(range(self.step, cfg.steps), initial=self.step, total=cfg.steps, desc="rl", dynamic_ncols=True)
        for step in bar:
            t = time.time()
            record = self.update(step)
            self.step = step + 1
            record.update(step=self.step, step_seconds=round(time.time() - t, 3))
            for k, v in record.items():
                if isinstance(v, float):
                    writer.add_scalar(f"train/{k}", v, self.step)
            bar.set_postfix(reward=f"{record.get('reward_mean', record.get('clip_cos', 0)):.3f}",
                            p1=f"{record['train_p_at_1']:.2f}", kl=f"{record['kl']:.3f}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                record["eval"] = self.evaluate()
                for k, v in record["eval"].items():
                    if isinstance(v, float):
                        writer.add_scalar(f"eval/{k}", v, self.step)
                self.log(f"step {self.step}: " + json.dumps({k: v for k, v in record["eval"].items()
                                                              if k != "examples"}))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save(self.out / "checkpoints" / f"step-{self.step}")
        self.save(self.out / "final")
        final = self.evaluate()
        final["rl_seconds"] = round(time.time() - t0, 1)
        final["updates"] = self.step - start
        (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
        writer.close()
        metrics_file.close()
        return final
