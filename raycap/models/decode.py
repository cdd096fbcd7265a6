"""The hot-path decoder: greedy or sampled ClipCap captions over a preallocated static KV cache (HF `StaticCache`,
GPT-2-style and LLaMA-style LMs), with one decode step captured in a CUDA graph on CUDA.

HF-style decoding grows its cache and concatenates every step: on a GPU that is launch-bound (DESIGN.md: 442 ms
of a 574 ms update at paper scale, where a static cache in a CUDA graph did the same 40 tokens x 100 images in
46 ms). Here every tensor the loop touches has a fixed shape: the cache holds prefix + max_new_tokens positions
from the start, each step feeds one token at a known cache position, so the step can be replayed as a graph.
It must equal `ClipCap.generate` (raycap.models.decoding) token for token; beam search stays there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raycap.models.captioner import Captions
from raycap.models.decoding import next_token


def rollout_decoder(captioner):
    """What decodes a role's rollouts: a `StaticDecoder` (static cache, CUDA graph) for a ClipCap on CUDA, the
    captioner's own `generate` elsewhere (a CPU, or a captioner the static decoder does not know, e.g. BLIP).
    Both produce the same tokens."""
    if getattr(captioner, "lm", None) is not None and hasattr(captioner, "prefix") \
            and captioner.device.type == "cuda":
        return StaticDecoder(captioner)
    return captioner


class StaticDecoder:
    """`generate(image_embeds, mode, ...)` like `ClipCap.generate` for greedy and sampling.

    `static` (default: on CUDA only) decodes over the preallocated cache; otherwise it is ClipCap's own loop over
    HF's growing cache, which is what a CPU wants: there no kernel launch is saved, and attending over every
    preallocated slot under a mask cost 5-12% against attending over what exists (benchmarks/decode.py)."""

    def __init__(self, captioner, cuda_graph: bool | None = None, static: bool | None = None):
        self.captioner = captioner
        on_cuda = captioner.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.static = (on_cuda or self.cuda_graph) if static is None else static
        if self.cuda_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs the captioner on a CUDA device")
        if self.cuda_graph and not self.static:
            raise ValueError("cuda_graph=True needs static=True (a graph replays fixed shapes)")
        self._steps: dict[tuple[int, int], _Step] = {}  # per (rows, cache length): its cache and captured graph

    def _step_for(self, N: int, length: int, dev) -> "_Step":
        """The decode step (static cache + CUDA graph) of this shape: captured once, reset and replayed by every
        later `generate` of the same shape."""
        from transformers import StaticCache

        step = self._steps.get((N, length))
        if step is None:
            cache = StaticCache(config=self.captioner.lm.config, max_cache_len=length)
            step = self._steps[(N, length)] = _Step(self.captioner.lm, cache, N, length, dev, self.cuda_graph)
        else:
            step.cache.reset()
        return step

    @torch.no_grad()
    def generate(self, image_embeds: Tensor, mode: str = "greedy", temperature: float = 1.0,
                 max_new_tokens: int | None = None, generator: torch.Generator | None = None,
                 num_samples: int = 1, noise: Tensor | None = None) -> Captions:
        if mode not in ("greedy", "sample"):
            raise ValueError(f"StaticDecoder decodes greedy or sample, not {mode!r} (beam: ClipCap.generate)")
        cap = self.captioner
        if not self.static:
            return cap.generate(image_embeds, mode=mode, temperature=temperature, max_new_tokens=max_new_tokens,
                                generator=generator, num_samples=num_samples, noise=noise)
        lm = cap.lm
        max_new = cap.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        prefix = cap.prefix(image_embeds).repeat_interleave(num_samples, dim=0)
        N, P, dev = prefix.shape[0], prefix.shape[1], prefix.device
        step = self._step_for(N, P + max_new, dev)
        cache = step.cache
        positions = torch.arange(P, device=dev)
        out = lm(inputs_embeds=prefix.to(lm.dtype), cache=cache, cache_position=positions,
                 position_ids=positions[None].expand(N, -1), use_cache=True)
        logits = out.logits[:, -1].float()
        stop = torch.tensor(cap.stop_ids, dtype=torch.long, device=dev)
        tokens = torch.full((N, max_new), cap.config.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(N, max_new, device=dev)
        lengths = torch.zeros(N, dtype=torch.long, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        T = 0
        for t in range(max_new):
            nxt, lp = next_token(logits, mode, temperature, generator, None if noise is None else noise[t])
            nxt = nxt.masked_fill(done, cap.config.pad_token_id)
            tokens[:, t], logprobs[:, t] = nxt, lp.masked_fill(done, 0.0)
            lengths += (~done).long()
            done |= torch.isin(nxt, stop)
            T = t + 1
            if bool(done.all()) or t + 1 == max_new:
                break
            logits = step(nxt, P + t)
        return Captions(tokens[:, :T], lengths, logprobs[:, :T])


class _Step:
    """One decode step, `(ids (N,), cache position) -> next logits (N, V)`, eager or replayed as a CUDA graph
    (static input buffers, captured on first use after a warm-up run on a side stream)."""

    def __init__(self, lm, cache, N: int, length: int, dev, cuda_graph: bool):
        self.lm, self.cache, self.graph = lm, cache, None
        self.ids = torch.zeros(N, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(length, device=dev)
        self.eager = getattr(lm.config, "_attn_implementation", "sdpa") == "eager"
        self.cuda_graph = cuda_graph

    def _mask(self) -> Tensor:
        """The step's attention mask over the cache's slots, made here from the position (every row attends to
        the prefix and all tokens so far: finished rows decode pads that are dropped later) and handed to the
        LM as a prepared 4D mask, so transformers does not rebuild a causal mask every step: boolean (keep) for
        SDPA and flash attention, additive for eager attention."""
        keep = (self.slots <= self.pos)[None, None, None, :]
        if self.eager:
            dtype = self.lm.dtype
            return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        return keep

    def _forward(self) -> Tensor:
        out = self.lm(input_ids=self.ids, cache=self.cache, cache_position=self.pos, attention_mask=self._mask(),
                      position_ids=self.pos[None].expand(self.ids.shape[0], -1), use_cache=True)
        return out.logits[:, -1].float()

    def __call__(self, ids: Tensor, position: int) -> Tensor:
        self.ids.copy_(ids[:, None])
        self.pos.fill_(position)
        if not self.cuda_graph:
            return self._forward()
        if self.graph is None:
            # under bf16 autocast, capture without autocast's weight cache (torch.cuda.graph's rule): the graph
            # then casts the live fp32 weights at every replay, so updated weights are what it decodes with
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                 enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), amp:
                self.out = self._forward()  # warm-up: writes this position's cache slot, as the replay will
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), amp:
                self.out = self._forward()
        self.graph.replay()
        return self.out.clone()
