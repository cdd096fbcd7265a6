"""One DiscriTune or Gumbel update, cut into the pieces the distributed runtime places on different processes.

- `rollout`: the captioner decodes a batch (sampled or greedy) with a seeded generator;
- `Scorer`: the frozen retriever and the cached image embeddings draw the batch and its candidates, and turn
  captions into rewards (task reward plus the optional word-swap self-check);
- `Advantages`: the baseline (none, running mean, self-critical, leave-one-out);
- `reinforce_loss` / `gumbel_loss`: the learner's loss, with the KL guard to the frozen reference captioner;
  `reinforce_backward`: that loss's backward pass over micro-batches (`rl.optimiser.micro_batch`);
- `drift_stats`, `changes_weights`: two safeguards both runtimes log, `logprob_drift` (the decoder's token
  log-probs against the learner's) and `sync_changed` (whether a weight sync or step changed the decoder's weights).

The policy is the distribution rollouts sample from: softmax(logits / temperature) when `rollout: sample`, so
the REINFORCE log-probs, the KL guard and the entropy all read the tempered logits. Rollouts that an older
policy sampled (`runtime.max_policy_lag: 1`) are reweighted by a truncated sequence importance ratio.

The reference loop (`raycap.local_trainer`) calls them in one process and `raycap.runtime` calls the very
same functions inside actors, so the two compute the same update. No Ray here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from raycap.config import RunConfig
from raycap.data import distractors
from raycap.models.captioner import Captioner, Captions
from raycap.models.tokenizers import decode
from raycap.rl import baselines, losses, rewards
from raycap.rl.gumbel import gumbel_decode
from raycap.rl.self_check import self_check, substitution_margins, substitution_score, substitutions_passed

CANDIDATES, ROLLOUT, SELF_CHECK, GUMBEL = 0, 1, 2, 3  # independent random streams of one step


def generator(seed: int, step: int, stream: int, shard: int = 0) -> torch.Generator:
    """The generator of one random stream of one step (and one rollout shard): any process can rebuild it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream, shard]).generate_state(1)[0]))


def policy_temperature(cfg: RunConfig) -> float:
    """The temperature of the policy being trained: the sampling temperature (greedy rollouts: 1)."""
    return cfg.rl.sampling.temperature if cfg.rl.sampling.rollout == "sample" else 1.0


def rollout(policy: Captioner, img: torch.Tensor, cfg: RunConfig, step: int, shard: int = 0,
            greedy: bool = False, decoder=None) -> Captions:
    """Captions of one shard of a step's images: `num_samples` sampled per image (image-major), or greedy.
    `decoder`: what decodes them (`raycap.models.decode.rollout_decoder`: the static-cache decoder on CUDA),
    by default the policy's own `generate`; both give the same tokens."""
    policy.eval()  # no dropout in RL: the learner scores exactly the policy that sampled
    decode = (decoder or policy).generate
    if greedy or cfg.rl.sampling.rollout == "greedy":
        return decode(img, mode="greedy", num_samples=1 if greedy else cfg.rl.sampling.num_samples)
    return decode(img, mode="sample", temperature=cfg.rl.sampling.temperature, num_samples=cfg.rl.sampling.num_samples,
                           generator=generator(cfg.seed, step, ROLLOUT, shard))


@dataclass
class Scores:
    reward: torch.Tensor          # (N,) what REINFORCE maximises: task reward + self_check.coef * check
    task: torch.Tensor            # (N,) the task reward alone (with the cosine term if cosine_coef)
    check: torch.Tensor | None    # (N,) the self-check alone (None when off)
    accuracy: torch.Tensor        # (N,) 1 if the caption retrieves its image among the candidates
    texts: list[str]
    verified: torch.Tensor | None = None  # (N,) bool: passes the substitution check (self_check.gate; else None)
    terms: dict[str, torch.Tensor] | None = None  # (N,) each reward term as computed, before any normalisation

    def cpu(self) -> Scores:
        """The same scores on the CPU (float32; `verified` stays bool), to send from the reward service."""
        def move(t):
            return None if t is None else t.float().cpu()

        return Scores(move(self.reward), move(self.task), move(self.check), move(self.accuracy), self.texts,
                      None if self.verified is None else self.verified.cpu(),
                      None if self.terms is None else {k: move(v) for k, v in self.terms.items()})


def summarise(scores: Scores, lengths: torch.Tensor) -> dict:
    """The step's reward statistics, as logged by both runtimes."""
    out = {"reward_mean": float(scores.reward.mean()), "reward_std": float(scores.reward.std()),
           "train_p_at_1": float(scores.accuracy.mean()), "caption_length": float(lengths.float().mean()),
           "example": scores.texts[0]}
    if scores.check is not None:
        out |= {"task_reward": float(scores.task.mean()), "self_check": float(scores.check.mean())}
    if scores.verified is not None:
        out["verified"] = float(scores.verified.float().mean())
    if scores.terms is not None and len(scores.terms) > 1:  # the summed terms apart (the sum may be standardised)
        out |= {f"term_{k}": float(v.mean()) for k, v in scores.terms.items()}
    return out


class Scorer:
    """Frozen retriever + cached image embeddings: each step's batch and candidates, and caption rewards."""

    def __init__(self, retriever, images: torch.Tensor, tokenizer, stop_ids, cfg: RunConfig,
                 inputs: torch.Tensor | None = None, fluency: torch.nn.Module | None = None):
        """`images`: the retriever's embeddings of the pool; `inputs`: what the captioner reads per image when
        not those (BLIP's own frozen features)."""
        self.retriever, self.images, self.tokenizer, self.stop_ids, self.cfg = retriever, images, tokenizer, stop_ids, cfg
        self.inputs = images if inputs is None else inputs
        self.fluency = fluency  # the fluency model (raycap.models.fluency) when rl.reward.fluency_coef is set
        self.logit_scale = float(retriever.logit_scale)
        self._token_map = None

    @property
    def token_map(self):
        """The captioner-to-retriever token map for Gumbel captions, built on first use (`raycap.models.vocab`)."""
        if self._token_map is None:
            from raycap.models.vocab import build_token_map

            self._token_map = build_token_map(self.tokenizer, self.retriever, self.stop_ids)
        return self._token_map

    def encode_soft(self, probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Text embeddings of soft captions in the captioner's vocabulary, through the token map."""
        x, eot = self.token_map.to_clip(probs, lengths, self.retriever.model.token_embedding.weight,
                                        self.retriever.context_length)
        return self.retriever.encode_soft_embeddings(x, eot)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image indices, what the captioner reads of them, candidate indices with the target in column 0)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.from_numpy(rng.choice(len(self.images), size=cfg.rl.batch_size, replace=False))
        k_hard, skip = cfg.rl.reward.distractors_at(step)
        cands = distractors.candidates(idx, self.images, k_hard, cfg.rl.reward.near_duplicate,
                                       cfg.rl.reward.num_candidates, generator=generator(cfg.seed, step, CANDIDATES),
                                       skip_nearest=skip)
        return idx, self.inputs[idx], cands

    def texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return decode(self.tokenizer, tokens, lengths, self.stop_ids)

    @torch.no_grad()
    def score(self, cands: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, step: int) -> Scores:
        """Rewards of N captions whose candidate rows are `cands` (N/k rows are repeated k times)."""
        cfg = self.cfg
        if cands.shape[0] != tokens.shape[0]:
            cands = cands.repeat_interleave(tokens.shape[0] // cands.shape[0], dim=0)
        texts = self.texts(tokens, lengths)
        emb = self.retriever.encode_captions(texts)
        rc = cfg.rl.reward
        terms = {rc.kind: (1.0, rewards.compute(rc.kind, emb, self.images, cands, self.logit_scale, batch=step))}
        if rc.cosine_coef:
            terms["cosine_term"] = (rc.cosine_coef, rewards.cosine(emb, self.images[cands[:, 0]], self.logit_scale))
        if rc.phrase_coef:
            grounding = rewards.phrase_grounding(texts, self.retriever.encode_captions, self.images, cands,
                                                 self.logit_scale)
            rewards.check_finite(grounding, step)
            terms["phrase"] = (rc.phrase_coef, grounding)
        if rc.fluency_coef:
            fluent = self.fluency.log_fluency(texts)
            rewards.check_finite(fluent, step)
            terms["fluency"] = (rc.fluency_coef, fluent)
        task = rewards.combine(list(terms.values()), rc.normalise_terms)
        check, reward, passed, sc = None, task, None, cfg.rl.self_check
        substituted = sc.kind == "substitute" and sc.coef
        if substituted or sc.gate:  # one encoding of the substitutes serves the check and the gate
            margins = substitution_margins(texts, self.images[cands[:, 0]], self.retriever.encode_captions,
                                           self.logit_scale, sc.substitution_classes)
            passed = substitutions_passed(margins, sc.gate_margin) if sc.gate else None
        if substituted:
            check = substitution_score(margins)
        elif sc.coef:
            check = self_check(texts, self.images[cands[:, 0]], self.retriever.encode_captions, self.logit_scale,
                               sc.variants, generator(cfg.seed, step, SELF_CHECK))
        if check is not None:
            rewards.check_finite(check, step)
            reward = task + sc.coef * check
        return Scores(reward, task, check, rewards.accuracy(emb, self.images, cands), texts, passed,
                      {name: term for name, (_, term) in terms.items()})


class Advantages:
    """The configured baseline; keeps the running mean's state for checkpoints."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.running = baselines.RunningMean(momentum=cfg.rl.algorithm.baseline_momentum)

    def baseline(self, reward: torch.Tensor, greedy_reward: torch.Tensor | None = None) -> torch.Tensor:
        return baselines.compute(self.cfg.rl.algorithm.baseline, reward, running=self.running, greedy=greedy_reward,
                                 num_samples=self.cfg.rl.sampling.num_samples)

    def __call__(self, reward: torch.Tensor, greedy_reward: torch.Tensor | None = None,
                 verified: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) advantages `R - b`; with `verified` (self_check.gate) a caption that failed the check is never
        pushed up (its advantage is at most `-gate_penalty`) and the `best` baseline imitates each image's best
        verified caption (`baselines.best_of_verified`) and gives every failed caption `-gate_penalty`. The
        running mean still sees every reward."""
        if verified is None:
            return reward - self.baseline(reward, greedy_reward)
        verified = verified.to(reward.device)
        penalty = self.cfg.rl.self_check.gate_penalty
        if self.cfg.rl.algorithm.baseline == "best":
            best = baselines.best_of_verified(reward, verified, self.cfg.rl.sampling.num_samples)
            return best - penalty * (~verified).to(best.dtype)
        advantages = reward - self.baseline(reward, greedy_reward)
        return torch.where(verified, advantages, advantages.clamp(max=-penalty))

    def state_dict(self) -> dict:
        return self.running.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.running.load_state_dict(state)


def kl_guard(reference: Captioner, img, tokens, lengths, logp, token_lp, estimator: str) -> torch.Tensor:
    """(N,) KL(policy || frozen reference captioner) on the given tokens, from the policy's (N, T, V) log-softmax
    `logp` and its log-probs `token_lp` at the tokens: exact per position ("full"), or the k2 estimate from the
    sampled tokens ("sampled"), whose gradient is the reverse KL's in expectation."""
    with torch.no_grad():
        ref = reference.logits(img, tokens).float()
        ref = ref.sub_(ref.logsumexp(-1, keepdim=True))  # its log-softmax, in place
    if estimator == "full":
        return losses.kl_full_from_logprobs(logp, ref, lengths)
    return losses.kl_sampled(token_lp, ref.gather(-1, tokens[..., None].to(ref.device)).squeeze(-1), lengths)


def reinforce_loss(policy: Captioner, reference: Captioner, img, tokens, lengths, advantages,
                   cfg: RunConfig, behaviour_logprobs: torch.Tensor | None = None,
                   rollout_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """REINFORCE `-(R-b) log P(c|i)` by teacher forcing, + kl_coef * KL guard - entropy_coef * entropy, all
    under the tempered policy. `behaviour_logprobs` (N, T): per-token log-probs under the policy that sampled
    the captions when it is older than this one (off-policy); each caption's term is then weighted by the
    importance ratio pi(c)/mu(c), truncated at `importance_ratio_cap`. `rollout_logprobs` (N, T): the decoder's
    per-token log-probs of the captions (under the tempered policy when sampled, like these), for the
    `logprob_drift` statistics only. The (N, T, V) log-softmax is computed once and read by every term."""
    policy.eval()
    logits = policy.logits(img, tokens)
    temperature = policy_temperature(cfg)
    logp = torch.log_softmax((logits if temperature == 1.0 else logits / temperature).float(), -1)
    del logits
    token_lp = logp.gather(-1, tokens[..., None].to(logp.device)).squeeze(-1)
    stats = {}
    weights = None
    if behaviour_logprobs is not None:
        ratio = losses.importance_ratio(token_lp.detach(), behaviour_logprobs.to(token_lp.device), lengths)
        weights = ratio.clamp(max=cfg.rl.algorithm.importance_ratio_cap)
        stats = {"importance_ratio_mean": float(ratio.mean()), "importance_ratio_max": float(ratio.max()),
                 "importance_ratio_truncated": float((ratio > cfg.rl.algorithm.importance_ratio_cap).float().mean())}
    if rollout_logprobs is not None:
        stats |= drift_stats(token_lp, rollout_logprobs, lengths)
    pg = losses.reinforce(token_lp, lengths, advantages, cfg.rl.algorithm.length_normalise, weights)
    kl = kl_guard(reference, img, tokens, lengths, logp, token_lp, cfg.rl.algorithm.kl_estimator)
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.rl.algorithm.entropy_coef)):
        ent = losses.entropy_from_logprobs(logp, lengths)  # only a statistic (no graph kept) unless in the loss
    loss = pg + cfg.rl.algorithm.kl_coef * kl.mean()
    if cfg.rl.algorithm.entropy_coef:
        loss = loss - cfg.rl.algorithm.entropy_coef * ent.mean()
    return loss, stats | {"kl": float(kl.detach().mean()), "entropy": float(ent.detach().mean()),
                          "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0}


def drift_stats(token_lp: torch.Tensor, rollout_logprobs: torch.Tensor, lengths: torch.Tensor) -> dict:
    """`logprob_drift`: the mean over captions of each one's mean |learner - rollout| token log-prob (~0 on-policy;
    a decoder that drifted from the learner, e.g. in precision or weights, shows here), and its max over tokens."""
    mean, worst = losses.logprob_drift(token_lp, rollout_logprobs.to(token_lp.device), lengths)
    return {"logprob_drift": float(mean.mean()), "logprob_drift_max": float(worst.max())}


def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """A cheap fingerprint of the model's trainable weights: each trainable tensor's sum of |w| (float64, CPU)."""
    with torch.no_grad():
        return torch.stack([p.detach().abs().sum(dtype=torch.float64) for p in model.parameters()
                            if p.requires_grad]).cpu()


def changes_weights(model: torch.nn.Module, apply) -> bool:
    """Whether `apply()` (a weight sync, an optimizer step) changed the model's trainable weights, by their
    `fingerprint`: a sync that silently moves nothing is the most reported kind of RL-trainer bug."""
    before = fingerprint(model)
    apply()
    return not torch.equal(before, fingerprint(model))


def micro_batches(n_images: int, micro_batch: int | None) -> list[slice]:
    """The image slices of one update's teacher-forced passes: `micro_batch` images each (all when None)."""
    per = n_images if not micro_batch else min(micro_batch, n_images)
    return [slice(a, min(a + per, n_images)) for a in range(0, n_images, per)]


def reinforce_backward(policy: Captioner, reference: Captioner, img, tokens, lengths, advantages, cfg: RunConfig,
                       step: int, backward, forward_context=contextlib.nullcontext,
                       behaviour_logprobs: torch.Tensor | None = None,
                       rollout_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """`reinforce_loss` and its backward pass over micro-batches of `rl.optimiser.micro_batch` images (with all their
    samples): each micro-batch's loss, weighted by its share of the captions, is checked (`check_loss`) and
    handed to `backward`, so the gradients accumulate to those of the whole batch's loss while only one
    micro-batch's (N, T, V) tensors are alive. Forward passes run inside `forward_context()` (the role's
    autocast), backward passes outside it; `behaviour_logprobs` and `rollout_logprobs` as `reinforce_loss` reads
    them. Returns (the whole batch's loss, detached; its statistics)."""
    k = tokens.shape[0] // img.shape[0]
    total, stats, n = 0.0, {}, tokens.shape[0]
    for part in micro_batches(img.shape[0], cfg.rl.optimiser.micro_batch):
        rows = slice(part.start * k, part.stop * k)
        with forward_context():
            loss, s = reinforce_loss(policy, reference, img[part], tokens[rows], lengths[rows], advantages[rows],
                                     cfg, None if behaviour_logprobs is None else behaviour_logprobs[rows],
                                     None if rollout_logprobs is None else rollout_logprobs[rows])
        weight = (rows.stop - rows.start) / n
        check_loss(loss, step)
        backward(loss * weight)
        total = total + loss.detach().float() * weight  # on the loss's device: no sync per micro-batch
        for key, v in s.items():
            stats[key] = max(stats.get(key, v), v) if key.endswith("_max") else stats.get(key, 0.0) + v * weight
    stats["advantage_std"] = float(advantages.std()) if advantages.numel() > 1 else 0.0
    return total, stats


def gumbel_loss(policy: Captioner, reference: Captioner, scorer: Scorer, img, cands, eos_id: int,
                cfg: RunConfig, step: int, shard: int = 0) -> tuple[torch.Tensor, dict]:
    """Straight-through Gumbel decode (noise of the step's GUMBEL stream) -> frozen CLIP text encoder ->
    `-cos(v, c)` or the discriminative loss, + kl_coef * KL guard. Gradients reach the captioner; the retriever
    is frozen."""
    policy.eval()
    soft = gumbel_decode(policy, img, eos_id, tau=cfg.rl.algorithm.gumbel_tau,
                         generator=generator(cfg.seed, step, GUMBEL, shard))
    text_emb = scorer.encode_soft(soft.probs, soft.lengths)
    target = scorer.images[cands[:, 0]]
    if cfg.rl.algorithm.gumbel_loss == "relevance":
        task = losses.clip_relevance(text_emb, target)
    else:
        task = -rewards.discriminative(text_emb, scorer.images, cands, scorer.logit_scale).mean()
    T = soft.logits.shape[1]
    kl_len = soft.lengths.clamp(max=T)
    tokens = soft.tokens[:, :T]
    logp = torch.log_softmax(soft.logits.float(), -1)
    kl = kl_guard(reference, img, tokens, kl_len, logp, logp.gather(-1, tokens[..., None]).squeeze(-1),
                  cfg.rl.algorithm.kl_estimator)
    loss = task + cfg.rl.algorithm.kl_coef * kl.mean()
    with torch.no_grad():
        acc = rewards.accuracy(text_emb, scorer.images, cands)
        cos = (text_emb * target).sum(-1)
    return loss, {"task_loss": float(task.detach()), "clip_cos": float(cos.mean()), "kl": float(kl.detach().mean()),
                  "train_p_at_1": float(acc.mean()), "caption_length": float(soft.lengths.float().mean())}


def check_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}: refusing to update")
