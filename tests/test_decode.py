"""The static-KV-cache decoder equals ClipCap's decoding (and so HF's) token for token, greedy and sampled, on a
GPT-2 and a LLaMA, on the first call of every shape. Its whole state machine (prefill, warm-up, the capture's run,
replays, per-shape and per-dtype reuse) runs here on the CPU as the eager twin of the CUDA path: only the graph
capture itself is left to a GPU (`-m cuda`, run by benchmarks/gpu_check.sh)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raycap.models import decode
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.decode import StaticDecoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")


def captioner(kind: str, attention: str = "sdpa", lm_class=None, end_bias: float = 0.0) -> ClipCap:
    """A tiny random ClipCap; `end_bias` is added to the end token's logit (rows then end at different lengths)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        lm = (lm_class or GPT2LMHeadModel)(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                      eos_token_id=49, bos_token_id=49))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          eos_token_id=49, bos_token_id=49, pad_token_id=0))
    lm.set_attn_implementation(attention)  # the decoder's prepared attention mask differs by implementation
    cfg = ClipCapConfig(clip_dim=16, prefix_length=3, lm={} if kind == "gpt2" else "unused", eos_token_id=49,
                        max_new_tokens=12)
    cap = ClipCap(cfg, lm=lm).eval()
    if end_bias:
        bias = torch.zeros(50)
        bias[49] = end_bias
        cap.lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias.to(out.device))
    return cap


def images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,attention", [("gpt2", "sdpa"), ("llama", "sdpa"), ("gpt2", "eager"),
                                            ("llama", "eager")])
def test_the_first_call_of_a_shape_runs_the_cuda_paths_calls_and_equals_the_reference(kind, attention, monkeypatch):
    """A fresh decoder's first call of a shape warms up and captures its step (here: the eager twin, the same
    calls), and its captions and log-probs still equal ClipCap's decoding and HF generate, greedy and sampled."""
    cap, x = captioner(kind, attention, end_bias=0.05), images()
    forwards = []
    real = decode._Step._forward
    monkeypatch.setattr(decode._Step, "_forward", lambda self: forwards.append(int(self.position)) or real(self))
    ours = StaticDecoder(cap, static=True).generate(x, mode="greedy")
    ref = cap.generate(x, mode="greedy")
    assert ours.tolist() == ref.tolist() and len(set(map(len, ref.tolist()))) > 1  # rows of different lengths
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-5, rtol=1e-4)
    assert forwards[:4] == [3, 3, 3, 4]  # the warm-up, the capture's run and the replay at position 3, then 4
    a = StaticDecoder(cap, static=True).generate(x, mode="sample", temperature=0.8, num_samples=2,
                                                 generator=torch.Generator().manual_seed(3))
    b = cap.generate(x, mode="sample", temperature=0.8, num_samples=2, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-4)
    hf = cap.lm.generate(inputs_embeds=cap.prefix(x), max_new_tokens=12, do_sample=False, eos_token_id=49,
                         pad_token_id=0, attention_mask=torch.ones(5, 3, dtype=torch.long))
    assert [row[:n] for row, n in zip(hf.tolist(), ours.lengths.tolist())] == ours.tolist()  # HF generate too
    with pytest.raises(ValueError, match="beam"):
        StaticDecoder(cap, static=True).generate(x, mode="beam")
    cpu = StaticDecoder(cap)  # off CUDA the default is ClipCap's own loop over HF's growing cache
    assert not cpu.static and cpu.generate(x).tolist() == ours.tolist()


def _cache_after_runs(step, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of layer 0 after the prefill and `runs` runs of the step at position 3 (the first token's)."""
    step.prefill(captioner("gpt2").prefix(images(2)))
    step.ids.fill_(7)
    step.position.fill_(3)
    for _ in range(runs):
        step._forward()
    return step.cache.layers[0].keys.clone(), step.cache.layers[0].keys[:, :, 4].clone()


@pytest.mark.parametrize("layer", ["positioned", "transformers_static"])
def test_a_step_run_twice_at_one_position_writes_the_same_slots(layer):
    """What a warm-up + capture + replay needs: the step holds its write position, so running it again at one
    position rewrites the same slot and never touches the next. transformers' own `StaticLayer` (its write counter
    advances with every run) is the negative control: this test would catch it."""
    from transformers.cache_utils import StaticLayer

    class Counted(StaticLayer):
        writes = 0

        def update(self, *args, **kwargs):
            self.writes += 1
            return super().update(*args, **kwargs)

    cap = captioner("gpt2")

    def fresh():
        step = decode._Step(cap.lm, 2, 15, torch.device("cpu"), cuda_graph=False)
        if layer == "transformers_static":
            step.cache.layers = [Counted(max_cache_len=15) for _ in step.cache.layers]
        return step

    once, next_once = _cache_after_runs(fresh(), 1)
    twice, next_twice = _cache_after_runs(fresh(), 2)
    idempotent = torch.equal(once, twice) and not next_twice.any()
    assert idempotent == (layer == "positioned")
    assert not next_once.any()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_one_decoder_reuses_its_step_per_shape_and_precision(kind):
    """One static cache and captured step per (rows, length, compute dtype): later calls reuse it and still equal
    the reference decoding; a new shape, or the same shape under bf16 autocast, gets its own (a cache built in
    bf16 cannot take fp32 keys)."""
    cap, x, y = captioner(kind), images(5, 1), images(5, 2)
    dec = StaticDecoder(cap, static=True)
    first = dec.generate(x).tolist()
    step = dec._steps[(5, 15, torch.float32)]
    assert dec.generate(y).tolist() == cap.generate(y).tolist()
    assert dec.generate(x).tolist() == first == cap.generate(x).tolist()
    assert dec._steps == {(5, 15, torch.float32): step}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = dec.generate(x)
        assert bf16.tolist() == StaticDecoder(cap, static=True).generate(x).tolist()
    assert dec.generate(x).tolist() == first  # fp32 again, after a bf16 call of the same shape
    dec.generate(x[:2])
    assert set(dec._steps) == {(5, 15, torch.float32), (5, 15, torch.bfloat16), (2, 15, torch.float32)}
    if kind == "gpt2":  # its projections run in bf16 (LLaMA's rotary embedding computes its keys in fp32)
        assert dec._steps[(5, 15, torch.bfloat16)].cache.layers[0].keys.dtype == torch.bfloat16


def test_the_cuda_capture_is_thread_local_and_replays_a_copy(monkeypatch):
    """The CUDA branch of `capture`, with torch.cuda's stream and graph objects replaced by recorders: a warm-up on
    a side stream, one run under capture in `thread_local` error mode (a process holding NCCL watchdog threads
    may capture), and replays that return a copy of the graph's output buffer."""
    calls = []

    class Graph:
        def replay(self):
            calls.append("replay")

    class Context:
        def __init__(self, name, **kw):
            self.name, self.kw = name, kw

        def __enter__(self):
            calls.append((self.name, self.kw))

        def __exit__(self, *exc):
            return False

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Context("stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: Context("graph", **kw))
    out = torch.ones(3)

    def fn():
        calls.append("run")
        return out

    replay = decode.capture(fn, torch.device("cpu"), cuda_graph=True)
    assert calls == [("stream", {}), "run", ("graph", {"capture_error_mode": "thread_local"}), "run"]
    got = replay()
    assert calls[-1] == "replay" and torch.equal(got, out) and got.data_ptr() != out.data_ptr()


def test_an_lm_that_ignores_the_cache_it_is_given_is_refused():
    """transformers releases before `cache=` (e.g. 5.17) take it into **kwargs and ignore it: every step would
    run on a fresh empty cache. The decoder detects the keyword and checks that the prefill wrote its cache."""
    class Ignores(GPT2LMHeadModel):
        def forward(self, input_ids=None, inputs_embeds=None, cache=None, **kwargs):
            return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    class NoCache(GPT2LMHeadModel):
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            kwargs.pop("cache", None)
            return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    with pytest.raises(RuntimeError, match="did not write the static cache"):
        StaticDecoder(captioner("gpt2", lm_class=Ignores), static=True).generate(images())
    with pytest.raises(TypeError, match="takes no KV cache argument"):
        StaticDecoder(captioner("gpt2", lm_class=NoCache), static=True).generate(images())


def test_captions_end_where_the_longest_row_ends_although_the_host_looks_every_few_tokens():
    """The loop looks at 'every row finished' only every DONE_CHECK_EVERY tokens; the captions still end at the
    longest row (no padding column is added by the steps decoded after the last row finished)."""
    cap = captioner("llama", end_bias=0.1)  # every row stops within a few tokens
    caps = StaticDecoder(cap, static=True).generate(images())
    assert caps.tokens.shape[1] == int(caps.lengths.max()) < decode.DONE_CHECK_EVERY
    assert caps.tolist() == cap.generate(images()).tolist()


def rollout_config(rollout: str):
    from raycap.config import RunConfig

    return RunConfig.model_validate({"rl": {"sampling": {"rollout": rollout, "num_samples": 3, "temperature": 0.8,
                                                         "max_new_tokens": 10},
                                            "algorithm": {"baseline": "mean"}}})


@pytest.mark.parametrize("rollout", ["sample", "greedy"])
def test_rollouts_through_the_static_decoder_equal_the_captioners_own(rollout):
    """The rollouts' decoder on CUDA (a static cache) gives the captions, lengths and log-probs of the loop a CPU
    keeps, for one step's seeded stream; on the CPU a role keeps the captioner's own loop."""
    from raycap.models.decode import rollout_decoder
    from raycap.rl.algorithm import rollout as rollout_step

    cap, cfg = captioner("gpt2"), rollout_config(rollout)
    img = torch.randn(4, cap.config.clip_dim)
    assert rollout_decoder(cap) is cap
    ours = rollout_step(cap, img, cfg, step=3, shard=1)
    static = rollout_step(cap, img, cfg, step=3, shard=1, decoder=StaticDecoder(cap, static=True))
    assert torch.equal(ours.tokens, static.tokens) and torch.equal(ours.lengths, static.lengths)
    assert torch.allclose(ours.logprobs, static.logprobs, atol=1e-5)


# -- on a GPU only: the capture itself ------------------------------------------------------------------------------

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_cuda_graph_first_call_equals_eager_and_the_reference(mode):
    cap = captioner("gpt2").cuda()
    x = images(4).cuda()
    kw = {"mode": mode, "num_samples": 2} if mode == "sample" else {"mode": mode}
    graph = StaticDecoder(cap, cuda_graph=True).generate(x, generator=torch.Generator().manual_seed(3), **kw)
    twin = StaticDecoder(cap, cuda_graph=False, static=True).generate(x, generator=torch.Generator().manual_seed(3),
                                                                      **kw)
    ref = cap.generate(x, generator=torch.Generator().manual_seed(3), **kw)
    assert graph.tolist() == twin.tolist() == ref.tolist()
    torch.testing.assert_close(graph.logprobs, ref.logprobs, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.cuda
def test_cuda_graph_is_captured_once_per_shape():
    cap = captioner("gpt2").cuda()
    dec = StaticDecoder(cap, cuda_graph=True)
    x, y = images(4, 1).cuda(), images(4, 2).cuda()
    assert dec.generate(x).tolist() == cap.generate(x).tolist()
    step = dec._steps[(4, 15, torch.float32)]
    replay = step.replay
    assert dec.generate(y).tolist() == cap.generate(y).tolist()
    assert dec._steps[(4, 15, torch.float32)].replay is replay


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rollout", ["sample", "greedy"])
def test_cuda_rollouts_use_the_graph_decoder_and_equal_cpu_rollouts(rollout):
    from raycap.models.decode import rollout_decoder
    from raycap.models.precision import autocast
    from raycap.rl.algorithm import rollout as rollout_step

    cap, cfg = captioner("gpt2"), rollout_config(rollout)
    img = torch.randn(4, cap.config.clip_dim)
    cpu = rollout_step(cap, img, cfg, step=3)
    gpu = cap.cuda()
    decoder = rollout_decoder(gpu)
    assert isinstance(decoder, StaticDecoder) and decoder.cuda_graph
    out = rollout_step(gpu, img.cuda(), cfg, step=3, decoder=decoder)
    assert torch.equal(out.tokens.cpu(), cpu.tokens) and torch.equal(out.lengths.cpu(), cpu.lengths)
    with torch.no_grad():  # a weight update large enough to change the captions reaches the captured graph
        gen = torch.Generator(device="cuda").manual_seed(0)
        for p in gpu.lm.parameters():
            p.add_(torch.randn(p.shape, device="cuda", generator=gen) * 0.5)
    again = rollout_step(gpu, img.cuda(), cfg, step=3, decoder=decoder)
    assert not torch.equal(again.tokens.cpu(), out.tokens.cpu()) or not torch.equal(again.lengths.cpu(),
                                                                                     out.lengths.cpu())
    assert torch.equal(again.tokens, rollout_step(gpu, img.cuda(), cfg, step=3).tokens)
    with autocast(torch.device("cuda"), torch.bfloat16):  # bf16 rollouts: the graph equals its eager twin
        graph = rollout_step(gpu, img.cuda(), cfg, step=3, decoder=decoder)
        twin = rollout_step(gpu, img.cuda(), cfg, step=3, decoder=StaticDecoder(gpu, cuda_graph=False, static=True))
    assert torch.equal(graph.tokens, twin.tokens) and graph.logprobs.dtype == torch.float32
    assert (4 * cfg.rl.sampling.num_samples if rollout == "sample" else 4) == graph.tokens.shape[0]


def test_the_dependency_floors_admit_only_the_apis_the_decoder_uses():
    """torch.get_autocast_dtype / is_autocast_enabled(device_type) need torch 2.4; the static decoder's cache
    keyword and StaticLayer are those of the transformers release the suite runs on (5.25)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {r.name: min(Version(s.version) for s in r.specifier if s.operator == ">=")
              for r in map(Requirement, deps) if r.name in ("torch", "transformers")}
    assert floors["torch"] >= Version("2.4") and floors["transformers"] >= Version("5.25")
