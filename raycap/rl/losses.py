"""REINFORCE with a KL guard, and the Gumbel-softmax losses (pure tensor code).

All per-token tensors are (N, T) with positions >= `lengths` ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device)[None] < lengths[:, None]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax of (N, T, V) logits read at the (N, T) tokens."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)


def sequence_logprob(token_logprobs: torch.Tensor, lengths: torch.Tensor, length_normalise: bool = False):
    """log P(c|i) per caption: summed, or divided by the caption's length."""
    lp = (token_logprobs * token_mask(lengths, token_logprobs.shape[1])).sum(1)
    return lp / lengths.clamp(min=1) if length_normalise else lp


def reinforce(token_logprobs: torch.Tensor, lengths: torch.Tensor, advantages: torch.Tensor,
              length_normalise: bool = False) -> torch.Tensor:
    """Mean over captions of -(R - b) * log P(c|i); advantages carry no gradient."""
    return -(advantages.detach() * sequence_logprob(token_logprobs, lengths, length_normalise)).mean()


def kl_full(policy_logits: torch.Tensor, reference_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of the next-token distributions, summed over each caption's positions
    (N,). Zero when the two agree; its gradient flows into the policy only."""
    logp = F.log_softmax(policy_logits.float(), -1)
    logq = F.log_softmax(reference_logits.detach().float(), -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * token_mask(lengths, per_token.shape[1])).sum(1)


def kl_sampled(policy_token_logprobs: torch.Tensor, reference_token_logprobs: torch.Tensor,
               lengths: torch.Tensor) -> torch.Tensor:
    """KL estimate from the sampled tokens only (k3 = exp(q-p) - (q-p) - 1 >= 0), for vocabularies too large
    for `kl_full`; (N,) summed over positions."""
    d = reference_token_logprobs.detach() - policy_token_logprobs
    per_token = d.exp() - d - 1
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
