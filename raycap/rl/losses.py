"""REINFORCE with a KL guard, and the Gumbel-softmax losses (pure tensor code).

All per-token tensors are (N, T) with positions >= `lengths` ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raycap.models.captioner import token_logprobs  # noqa: F401 — the learner's losses read it from here too


def token_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device)[None] < lengths[:, None]


def sequence_logprob(token_logprobs: torch.Tensor, lengths: torch.Tensor, length_normalise: bool = False):
    """log P(c|i) per caption: summed, or divided by the caption's length."""
    lp = (token_logprobs * token_mask(lengths, token_logprobs.shape[1])).sum(1)
    return lp / lengths.clamp(min=1) if length_normalise else lp


def reinforce(token_logprobs: torch.Tensor, lengths: torch.Tensor, advantages: torch.Tensor,
              length_normalise: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over captions of -w * (R - b) * log P(c|i); advantages and the (importance) weights w carry no
    gradient."""
    adv = advantages.detach() if weights is None else advantages.detach() * weights.detach()
    return -(adv * sequence_logprob(token_logprobs, lengths, length_normalise)).mean()


def importance_ratio(policy_token_logprobs: torch.Tensor, behaviour_token_logprobs: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """(N,) sequence importance ratios pi(c)/mu(c) from per-token log-probs (no gradient). REINFORCE on
    captions sampled by mu is unbiased for pi when each term is weighted by this ratio; truncating it (V-trace's
    rho-bar, verl's truncated IS) trades a little bias for bounded variance."""
    mask = token_mask(lengths, policy_token_logprobs.shape[1])
    d = ((policy_token_logprobs.detach() - behaviour_token_logprobs.detach()) * mask).sum(1)
    return d.clamp(max=80.0).exp()


def logprob_drift(policy_token_logprobs: torch.Tensor, behaviour_token_logprobs: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) mean and (N,) max over each caption's tokens of |log pi - log mu|: how far the learner's teacher-forced
    log-probs are from those the decoder reported for the same tokens (no gradient). Under the same weights it
    is numerical noise (~1e-7 in fp32); more means the decoder and the learner compute different policies."""
    mask = token_mask(lengths, policy_token_logprobs.shape[1])
    d = (policy_token_logprobs.detach() - behaviour_token_logprobs.detach()).abs() * mask
    return d.sum(1) / mask.sum(1).clamp(min=1), d.max(1).values


ROWS = 8  # captions per slice when a (N, T, V) computation runs slice by slice (bounds its temporaries)


class _FullKL(torch.autograd.Function):
    """Per-position KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs, computed `ROWS` captions at a time.
    It keeps only its two inputs for the backward pass (autograd's product rule would keep p and the difference
    too: two more (N, T, V) tensors, gigabytes at GPT-2's vocabulary); d KL / d log p_v = p_v (log p_v - log q_v
    + 1)."""

    @staticmethod
    def forward(ctx, logp, logq):
        ctx.save_for_backward(logp, logq)
        return torch.cat([(lp.exp() * (lp - lq)).sum(-1) for lp, lq in zip(logp.split(ROWS), logq.split(ROWS))])

    @staticmethod
    def backward(ctx, grad):
        logp, logq = ctx.saved_tensors
        parts = [g[..., None] * lp.exp() * (lp - lq + 1)
                 for g, lp, lq in zip(grad.split(ROWS), logp.split(ROWS), logq.split(ROWS))]
        return torch.cat(parts), None


def kl_full_from_logprobs(policy_logp: torch.Tensor, reference_logp: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
    """`kl_full` from the two (N, T, V) log-softmaxes; the gradient flows into the policy's only."""
    per_token = _FullKL.apply(policy_logp, reference_logp.detach())
    return (per_token * token_mask(lengths, per_token.shape[1])).sum(1)


def kl_full(policy_logits: torch.Tensor, reference_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of the next-token distributions, summed over each caption's positions
    (N,). Zero when the two agree; its gradient flows into the policy only."""
    return kl_full_from_logprobs(F.log_softmax(policy_logits.float(), -1),
                                 F.log_softmax(reference_logits.detach().float(), -1), lengths)


def kl_sampled(policy_token_logprobs: torch.Tensor, reference_token_logprobs: torch.Tensor,
               lengths: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) estimated from the policy's own sampled tokens, for vocabularies too large for
    `kl_full`; (N,) summed over positions. It is k2 = 0.5 (log p - log q)^2: its gradient,
    (log p - log q) grad log p, has the expectation of the exact KL's gradient under tokens drawn from p. (k3 =
    exp(q-p) - (q-p) - 1, an unbiased estimate of the KL's value, has as a loss the gradient of the *forward*
    KL(reference || policy): Tang & Munos 2025.)"""
    d = policy_token_logprobs - reference_token_logprobs.detach()
    per_token = 0.5 * d * d
    return (per_token * token_mask(lengths, per_token.shape[1])).sum(1)


def entropy(policy_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of each caption's next-token distributions (N,)."""
    return entropy_from_logprobs(F.log_softmax(policy_logits.float(), -1), lengths)


def entropy_from_logprobs(logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`entropy` from the (N, T, V) log-softmax; without gradients it runs `ROWS` captions at a time."""
    if torch.is_grad_enabled() and logp.requires_grad:
        per_token = -(logp.exp() * logp).sum(-1)
    else:
        per_token = torch.cat([-(lp.exp() * lp).sum(-1) for lp in logp.split(ROWS)])
    mask = token_mask(lengths, per_token.shape[1])
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def clip_relevance(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """Seed paper 2's Gumbel loss: -cos(v, c), averaged (embeddings L2-normalised)."""
    return -(text_emb * image_emb).sum(-1).mean()
