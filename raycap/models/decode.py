"""The hot-path decoder: greedy or sampled ClipCap captions over a preallocated static KV cache (GPT-2-style and
LLaMA-style LMs), with one decode step captured in a CUDA graph on CUDA.

HF-style decoding grows its cache and concatenates every step: on a GPU that is launch-bound (DESIGN.md: 442 ms
of a 574 ms update at paper scale, where a static cache in a CUDA graph did the same 40 tokens x 100 images in
46 ms). Here every tensor the loop touches has a fixed shape: the cache holds prefix + max_new_tokens positions
from the start, each step feeds one token at a position the step holds in a tensor, so the step can be replayed
as a graph. It must equal `ClipCap.generate` (raycap.models.decoding) token for token; beam search stays there.

What a replayed step may not have: hidden state that a run advances. transformers' `StaticLayer` writes at its
own `cumulative_length` counter, which the capture's warm-up advances, so its first replay would write one slot
past the position the mask shows. `PositionedLayer` writes at the step's position instead: running a step
twice at one position writes the same slots, which is what a warm-up, a capture and a replay need. Off CUDA
the step makes the very same calls (warm-up, the capture's run, replays) eagerly: the suite runs that twin.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from raycap.models.captioner import Captions
from raycap.models.decoding import DONE_CHECK_EVERY, keeps_logits, next_token, sampling_noise


def rollout_decoder(captioner):
    """What decodes a role's rollouts: a `StaticDecoder` (static cache, CUDA graph) for a ClipCap on CUDA, the
    captioner's own `generate` elsewhere (a CPU, or a captioner the static decoder does not know, e.g. BLIP).
    Both produce the same tokens."""
    if getattr(captioner, "lm", None) is not None and hasattr(captioner, "prefix") \
            and captioner.device.type == "cuda":
        return StaticDecoder(captioner)
    return captioner


def forward_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype a forward pass on `device` computes in here: the autocast dtype when autocast is on, else the
    weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weights


def cache_argument(lm) -> str:
    """The name under which the LM's forward takes a KV cache: `cache` (transformers >= 5.x) or
    `past_key_values`. An LM whose forward names neither cannot decode over a static cache."""
    params = inspect.signature(lm.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(lm).__name__}.forward takes no KV cache argument (cache / past_key_values): the static "
                    "decoder cannot use it")


def positioned_cache(config, max_cache_len: int, position: Tensor):
    """An HF `StaticCache` for `config` whose layers write at `position` (a 1-element long tensor)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class PositionedLayer(StaticLayer):
        """A static cache layer writing `key_states` at `position`, `position + 1`, ... (the caller's tensor),
        never at a counter of its own."""

        writes = 0  # updates received (read after the eager prefill: did the LM use this cache at all?)

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            self.writes += 1
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            slots = position + torch.arange(key_states.shape[-2], device=self.device)
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            return self.keys, self.values

    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise TypeError(f"the static decoder handles full-attention layers only, this LM's cache has {kinds}")
    cache.layers = [PositionedLayer(max_cache_len=max_cache_len) for _ in cache.layers]
    return cache


def capture(fn, device: torch.device, cuda_graph: bool):
    """`fn` (a step reading and writing only fixed buffers) as a replay callable: a warm-up run, then a run under
    capture, then replays. On CUDA the warm-up runs on a side stream and the capture records a CUDA graph
    (`thread_local` error mode: a process with NCCL watchdog threads may capture); off CUDA the same three runs
    are eager, so a step that is not idempotent at one position shows here exactly as its graph would.

    Under autocast the capture runs without autocast's weight cache (torch.cuda.graph's rule): the graph casts
    the live fp32 weights at every replay, so it decodes with whatever weights the learner last wrote."""
    amp = torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                         enabled=torch.is_autocast_enabled(device.type), cache_enabled=False)
    if not cuda_graph:
        with amp:
            fn()  # the warm-up
            fn()  # what the capture runs
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), amp:
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), amp:
        out = fn()

    def replay() -> Tensor:
        graph.replay()
        return out.clone()

    return replay


class StaticDecoder:
    """`generate(image_embeds, mode, ...)` like `ClipCap.generate` for greedy and sampling.

    `static` (default: on CUDA only) decodes over the preallocated cache, with a CUDA graph when `cuda_graph`
    (default: on CUDA) and with its eager twin otherwise; without `static` it is ClipCap's own loop over HF's
    growing cache, which is what a CPU wants: there no kernel launch is saved, and attending over every
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
        # per (rows, cache length, compute dtype): its cache and captured step
        self._steps: dict[tuple[int, int, torch.dtype], _Step] = {}

    def _step_for(self, N: int, length: int, dev: torch.device) -> "_Step":
        """The decode step of this shape and precision: built (and captured) once, reused by every later
        `generate` of the same shape and dtype."""
        dtype = forward_dtype(dev, self.captioner.lm.dtype)
        key = (N, length, dtype)
        if key not in self._steps:
            self._steps[key] = _Step(self.captioner.lm, N, length, dev, self.cuda_graph)
        return self._steps[key]

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
        max_new = cap.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        prefix = cap.prefix(image_embeds).repeat_interleave(num_samples, dim=0)
        N, P, dev = prefix.shape[0], prefix.shape[1], prefix.device
        if mode == "sample" and noise is None:  # every step's uniforms in one draw and one transfer
            noise = sampling_noise(max_new, N, generator).to(dev)
        step = self._step_for(N, P + max_new, dev)
        logits = step.prefill(prefix)
        stop = torch.tensor(cap.stop_ids, dtype=torch.long, device=dev)
        tokens = torch.full((N, max_new), cap.config.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(N, max_new, device=dev)
        lengths = torch.zeros(N, dtype=torch.long, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        for t in range(max_new):
            nxt, lp = next_token(logits, mode, temperature, generator, None if noise is None else noise[t])
            nxt = nxt.masked_fill(done, cap.config.pad_token_id)
            tokens[:, t], logprobs[:, t] = nxt, lp.masked_fill(done, 0.0)
            lengths += (~done).long()
            done |= torch.isin(nxt, stop)
            if t + 1 == max_new or ((t + 1) % DONE_CHECK_EVERY == 0 and bool(done.all())):
                break
            logits = step(nxt, P + t)
        T = int(lengths.max()) if N else 0
        return Captions(tokens[:, :T], lengths, logprobs[:, :T])


class _Step:
    """One decode step over a static cache, `(ids (N,), position) -> next logits (N, V)`, fp32: the prefill runs
    eagerly, each step after it through `capture` (a CUDA graph, or its eager twin)."""

    def __init__(self, lm, N: int, length: int, dev: torch.device, cuda_graph: bool):
        self.lm, self.cuda_graph, self.device = lm, cuda_graph, dev
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # where this step writes and reads up to
        self.cache = positioned_cache(lm.config, length, self.position)
        self.cache_arg = cache_argument(lm)
        self.ids = torch.zeros(N, 1, dtype=torch.long, device=dev)
        self.slots = torch.arange(length, device=dev)
        attention = getattr(lm.config, "_attn_implementation", "sdpa") or "sdpa"
        if attention not in ("sdpa", "eager"):  # flash attention reads a 2D padding mask and syncs on it
            raise ValueError(f"the static decoder runs sdpa or eager attention, this LM uses {attention!r}")
        self.eager = attention == "eager"
        self.keep_last = keeps_logits(type(lm))
        self.replay = None

    def prefill(self, prefix: Tensor) -> Tensor:
        """Write the prefix's keys and values at slots 0..P-1 and return the logits after it."""
        N, P = prefix.shape[:2]
        self.position.zero_()
        writes = self.cache.layers[0].writes
        positions = torch.arange(P, device=self.device)
        last = {"logits_to_keep": 1} if self.keep_last else {}  # the LM head at the last position only
        out = self.lm(inputs_embeds=prefix.to(self.lm.dtype), **{self.cache_arg: self.cache},
                      cache_position=positions, position_ids=positions[None].expand(N, -1), use_cache=True, **last)
        if self.cache.layers[0].writes == writes:
            raise RuntimeError(f"{type(self.lm).__name__} did not write the static cache it was given as "
                               f"`{self.cache_arg}=`: this transformers version ignores it (raycap needs the "
                               "versions pyproject.toml names)")
        return _head_logits(out)

    def _mask(self) -> Tensor:
        """The step's attention mask over the cache's slots, made from the position (every row attends to the
        prefix and all tokens so far: finished rows decode pads that are dropped later) and handed to the LM as
        a prepared 4D mask, so transformers does not rebuild a causal mask every step: boolean (keep) for SDPA,
        additive for eager attention."""
        keep = (self.slots <= self.position)[None, None, None, :]
        if self.eager:
            dtype = self.lm.dtype
            return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        return keep

    def _forward(self) -> Tensor:
        out = self.lm(input_ids=self.ids, **{self.cache_arg: self.cache}, cache_position=self.position,
                      attention_mask=self._mask(), position_ids=self.position[None].expand(self.ids.shape[0], -1),
                      use_cache=True)
        return _head_logits(out)

    def __call__(self, ids: Tensor, position: int) -> Tensor:
        self.ids.copy_(ids[:, None])
        self.position.fill_(position)
        if self.replay is None:
            self.replay = capture(self._forward, self.device, self.cuda_graph)
        return self.replay()


def _head_logits(out) -> Tensor:
    return out.logits[:, -1].float()
