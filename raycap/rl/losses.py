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


def kl_full(policy_logits: torch.Tensor, reference_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of the next-token distributions, summed over each caption's positions
    (N,). Zero when the two agree; its gradient flows into the policy only."""
    logp = F.log_softmax(policy_logits.float(), -1)
    logq = F.log_softmax(reference_logits.detach().float(), -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * token_mask(lengths, per_token.shape[1])).sum(1)


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
    logp = F.log_softmax(policy_logits.float(), -1)
    per_token = -(logp.exp() * logp).sum(-1)
    mask = token_mask(lengths, per_token.shape[1])
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def clip_relevance(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """Seed paper 2's Gumbel loss: -cos(v, c), averaged (embeddings L2-normalised)."""
    return -(text_emb * image_emb).sum(-1).mean()
