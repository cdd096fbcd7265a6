"""Batched decoding shared by raycap's captioners: greedy, sampling (one CPU-drawn uniform per row, so a seed
gives the same captions on CPU and GPU) and beam search, with or without the KV cache, and teacher-forced
log-probs. A captioner mixes in `Decoding` and provides `_start(inputs)` (the per-image decoding state: ClipCap's
prefix embeddings, BLIP's vision features), `_step(state, tokens, past, use_cache)` (next-token logits and the
cache), `logits(inputs, tokens)`, `config.max_new_tokens`, `config.pad_token_id` and `stop_ids`."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from raycap.models.captioner import Captions, token_logprobs

DONE_CHECK_EVERY = 8  # decoded tokens between the host's looks at "every row finished" (each look waits for the device)


def _reorder_cache(past, idx: Tensor):
    """Select batch rows `idx` of a HF KV cache (Cache object or legacy tuples)."""
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(idx)
        return past
    return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in past)


def sample_next(logits: Tensor, temperature: float, generator: torch.Generator | None,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from softmax(logits / temperature); returns (ids, their log-probs under that
    tempered distribution). The randomness is one uniform per row drawn on the CPU with `generator` (a CPU
    generator, as `raycap.rl.algorithm.generator` builds) and then moved to the logits' device, so sampling
    never hands a CPU generator to a CUDA op and the same seed draws the same captions on CPU and GPU; or the
    row's given float64 `noise` (N,) uniform, so a caller can decode any subset of rows with their own draws."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    if noise is None:
        noise = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    u = noise.to(logits.device, torch.float64)[:, None]
    cdf = logp.double().exp().cumsum(-1)
    nxt = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    return nxt, logp.gather(1, nxt[:, None]).squeeze(1)


def sampling_noise(max_new: int, rows: int, generator: torch.Generator | None) -> Tensor:
    """A sampled decode's uniforms in one CPU draw: (max_new, rows) float64, row r's step-t draw at [t, r], the
    very numbers `sample_next` would draw step by step with `generator` (a CPU generator fills in order)."""
    return torch.rand(max_new, rows, generator=generator, dtype=torch.float64)


def next_token(logits: Tensor, mode: str, temperature: float, generator: torch.Generator | None,
               noise: Tensor | None = None):
    """(ids, log-probs) of one decoding step: the argmax under the model's distribution ("greedy"), or a draw
    from the tempered one ("sample", `sample_next`)."""
    if mode == "greedy":
        nxt = logits.argmax(-1)
        return nxt, F.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1)
    return sample_next(logits, temperature, generator, noise)


def repeat_rows(inputs: Tensor, n: int) -> Tensor:
    """Per-image inputs with n/k rows repeated k times (the num_samples layout) to match n token rows."""
    if inputs.size(0) == n:
        return inputs
    if inputs.size(0) == 0 or n % inputs.size(0):
        raise ValueError(f"{inputs.size(0)} image inputs do not divide {n} token rows")
    return inputs.repeat_interleave(n // inputs.size(0), dim=0)


def _pad(rows: list[Tensor], value, dtype, device) -> Tensor:
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Decoding:
    """generate() and log_probs() over a captioner's `_start`, `_step` and `logits`."""

    # -------------------------------------------------------------------------
    # decoding

    @torch.no_grad()
    def generate(self, image_embeds: Tensor, mode: str = "greedy", temperature: float = 1.0, num_beams: int = 5,
                 max_new_tokens: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, num_samples: int = 1,
                 noise: Tensor | None = None) -> Captions:
        """Decode captions for (B, clip_dim) embeddings with mode "greedy" | "sample" | "beam".

        Returns B*num_samples captions, image-major. For beam search, num_samples (<= num_beams) is the number
        of best hypotheses returned per image. `logprobs` are under the distribution the tokens were drawn from:
        softmax(logits / temperature) when sampling (the tempered policy), the model's own otherwise.
        `noise` (max_new_tokens, B*num_samples) float64 uniforms replace the generator's draws when sampling:
        row r's step-t draw is `noise[t, r]`, the order `generator` would have drawn them in.
        """
        max_new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        prefix = self._start(image_embeds)
        if mode == "beam":
            if not 1 <= num_samples <= num_beams:
                raise ValueError(f"beam search needs 1 <= num_samples <= num_beams, got {num_samples}, {num_beams}")
            return self._beam(prefix, num_beams, num_samples, max_new, use_cache)
        if mode not in ("greedy", "sample"):
            raise ValueError(f"unknown decoding mode {mode!r} (expected 'greedy', 'sample' or 'beam')")
        if mode == "sample" and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        prefix = prefix.repeat_interleave(num_samples, dim=0)
        N, dev = prefix.size(0), prefix.device
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=dev)
        tokens = torch.empty(N, 0, dtype=torch.long, device=dev)
        logprobs = torch.empty(N, 0, device=dev)
        lengths = torch.zeros(N, dtype=torch.long, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        past = None
        if noise is not None and (noise.dim() != 2 or noise.shape[1] != N or noise.shape[0] < max_new):
            raise ValueError(f"noise must be ({max_new}, {N}) uniforms, got {tuple(noise.shape)}")
        if mode == "sample" and noise is None:  # every step's uniforms in one draw (the same numbers) and one move
            noise = sampling_noise(max_new, N, generator).to(dev)
        for t in range(max_new):
            logits, past = self._step(prefix, tokens, past, use_cache)
            nxt, lp = next_token(logits, mode, temperature, generator, None if noise is None else noise[t])
            nxt = nxt.masked_fill(done, self.config.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logprobs = torch.cat([logprobs, lp.masked_fill(done, 0.0)[:, None]], 1)
            lengths += (~done).long()
            done |= torch.isin(nxt, stop)
            if (t + 1) % DONE_CHECK_EVERY == 0 and bool(done.all()):  # the host waits for the device only here
                break
        T = int(lengths.max()) if N else 0
        return Captions(tokens[:, :T], lengths, logprobs[:, :T])

    def _beam(self, prefix: Tensor, K: int, keep: int, max_new: int, use_cache: bool) -> Captions:
        """Batched beam search over total log-prob; finished hypotheses are set aside (no length penalty)."""
        B, dev = prefix.size(0), prefix.device
        prefix = prefix.repeat_interleave(K, dim=0)  # (B*K, P, H); all beams of an image start identical
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # only beam 0 is live at step 0, so the K beams diverge
        seqs = torch.empty(B * K, 0, dtype=torch.long, device=dev)
        lps = torch.empty(B * K, 0, device=dev)
        base = torch.arange(B, device=dev)[:, None] * K
        finished: list[list[tuple[float, Tensor, Tensor]]] = [[] for _ in range(B)]
        done = [False] * B
        past = None
        for t in range(max_new):
            logits, past = self._step(prefix, seqs, past, use_cache)
            logp = F.log_softmax(logits, -1)  # (B*K, V)
            V = logp.size(-1)
            cand = (scores.view(-1, 1) + logp).view(B, K, V)
            # stop tokens ranked within the top K candidates become finished hypotheses
            top_s, top_i = cand.view(B, -1).topk(K, dim=1)
            for i, j in torch.isin(top_i % V, stop).nonzero().tolist():
                if not done[i]:
                    b, tok = divmod(int(top_i[i, j]), V)
                    r = i * K + b
                    finished[i].append((float(top_s[i, j]), torch.cat([seqs[r], seqs.new_tensor([tok])]),
                                        torch.cat([lps[r], logp[r, tok].view(1)])))
            # the best K non-stop continuations keep running
            cand[:, :, stop] = float("-inf")
            scores, idx = cand.view(B, -1).topk(K, dim=1)
            src, tok = (base + idx // V).view(-1), (idx % V).view(-1)
            seqs = torch.cat([seqs[src], tok[:, None]], 1)
            lps = torch.cat([lps[src], logp[src, tok][:, None]], 1)
            if past is not None:
                past = _reorder_cache(past, src)
            # log-probs only decrease, so an image is done once its `keep` best finished beat every running beam
            best_running = scores[:, 0].tolist()
            for i in range(B):
                if not done[i] and len(finished[i]) >= keep:
                    done[i] = sorted(s for s, _, _ in finished[i])[-keep] >= best_running[i]
            if all(done):
                break
        rows, row_lps, lengths = [], [], []
        for i in range(B):
            pool = list(finished[i])
            if not done[i]:  # reached max_new_tokens: running beams compete too
                pool += [(float(scores[i, k]), seqs[i * K + k], lps[i * K + k]) for k in range(K)]
            pool.sort(key=lambda h: -h[0])
            for _, seq, lp in pool[:keep]:
                rows.append(seq)
                row_lps.append(lp)
                lengths.append(len(seq))
        tokens = _pad(rows, self.config.pad_token_id, torch.long, dev)
        return Captions(tokens, torch.tensor(lengths, dtype=torch.long, device=dev),
                        _pad(row_lps, 0.0, torch.float32, dev))

    def log_probs(self, image_embeds: Tensor, tokens: Tensor, lengths: Tensor, reduction: str = "none") -> Tensor:
        """Teacher-forced log-probs of `tokens` (N, T) given the images; positions >= `lengths` are masked.

        image_embeds may have N/k rows (repeat_interleaved k times, the num_samples layout).
        reduction: "none" -> (N, T); "sum" -> (N,); "mean" -> (N,) sum / length.
        """
        T = tokens.shape[1]
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        lp = token_logprobs(self.logits(image_embeds, tokens), tokens)
        lp = lp.masked_fill(torch.arange(T, device=lp.device)[None] >= lengths[:, None], 0.0)
        if reduction == "none":
            return lp
        if reduction == "sum":
            return lp.sum(1)
        if reduction == "mean":
            return lp.sum(1) / lengths.clamp(min=1)
        raise ValueError(f"unknown reduction {reduction!r} (expected 'none', 'sum' or 'mean')")


@functools.lru_cache(maxsize=None)
def keeps_logits(lm_class: type) -> bool:
    """Whether the LM class's forward takes `logits_to_keep` (transformers' causal LMs since 4.50); read once per
    class, not per teacher-forced pass."""
    import inspect

    return "logits_to_keep" in inspect.signature(lm_class.forward).parameters


def soft_embeddings(embedding: torch.nn.Module, probs: Tensor) -> Tensor:
    """Input embeddings of soft tokens (N, V) -> (N, 1, width): `probs @ weight`, times the embedding's own scale
    where the module applies one in its forward (Gemma's scaled word embeddings), so a one-hot row embeds as its
    token id does (exactly in fp32; under bf16 autocast the product is bf16, as the rest of the forward is)."""
    w = embedding.weight
    x = probs.to(w.dtype) @ w
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:
        x = x * (scale.to(w.dtype) if isinstance(scale, Tensor) else scale)
    return x[:, None]


def cached_forward(lm, past, **kwargs):
    """`lm(**kwargs)` continuing from the KV cache `past` (None: a new one); returns (output, its cache).
    transformers 5 takes and returns the cache as `cache`, earlier releases as `past_key_values`."""
    import inspect

    name = _CACHE_NAME.get(type(lm))
    if name is None:
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        _CACHE_NAME[type(lm)] = name
    out = lm(**kwargs, **{name: past}, use_cache=True)
    return out, getattr(out, name)


_CACHE_NAME: dict[type, str] = {}
