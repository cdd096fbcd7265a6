"""The static-KV-cache decoder equals ClipCap's decoding (and so HF's) token for token, greedy and sampled, on a
GPT-2 and a LLaMA; its CUDA-graph step is exercised only on CUDA."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.decode import StaticDecoder


def captioner(kind: str, attention: str = "sdpa") -> ClipCap:
    torch.manual_seed(0)
    if kind == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                        eos_token_id=49, bos_token_id=49))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          eos_token_id=49, bos_token_id=49, pad_token_id=0))
    lm.set_attn_implementation(attention)  # the decoder's prepared attention mask differs by implementation
    cfg = ClipCapConfig(clip_dim=16, prefix_length=3, lm={} if kind == "gpt2" else "unused", eos_token_id=49,
                        max_new_tokens=12)
    return ClipCap(cfg, lm=lm).eval()


@pytest.mark.parametrize("kind,attention", [("gpt2", "sdpa"), ("llama", "sdpa"), ("gpt2", "eager"),
                                            ("llama", "eager")])
def test_static_decoder_equals_the_reference_decoding(kind, attention):
    cap = captioner(kind, attention)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ours = StaticDecoder(cap, static=True).generate(x, mode="greedy")
    ref = cap.generate(x, mode="greedy")
    assert ours.tolist() == ref.tolist()
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-5, rtol=1e-4)
    a = StaticDecoder(cap, static=True).generate(x, mode="sample", temperature=0.8, num_samples=2,
                                    generator=torch.Generator().manual_seed(3))
    b = cap.generate(x, mode="sample", temperature=0.8, num_samples=2, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()
    hf = cap.lm.generate(inputs_embeds=cap.prefix(x), max_new_tokens=12, do_sample=False, eos_token_id=49,
                         pad_token_id=0, attention_mask=torch.ones(5, 3, dtype=torch.long))
    assert [row[:n] for row, n in zip(hf.tolist(), ours.lengths.tolist())] == ours.tolist()  # HF generate too
    with pytest.raises(ValueError, match="beam"):
        StaticDecoder(cap, static=True).generate(x, mode="beam")
    cpu = StaticDecoder(cap)  # off CUDA the default is ClipCap's own loop over HF's growing cache
    assert not cpu.static and cpu.generate(x).tolist() == ours.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph step needs a GPU")
def test_cuda_graph_step_equals_eager():
    cap = captioner("gpt2").cuda()
    x = torch.randn(4, 16, device="cuda")
    assert StaticDecoder(cap, cuda_graph=True).generate(x).tolist() == StaticDecoder(cap, cuda_graph=False).generate(x).tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_one_decoder_reuses_its_step_per_shape_with_the_same_captions(kind):
    """A decoder keeps one static cache (and, on CUDA, one captured graph) per shape: repeated calls reset and
    reuse it, and still equal the reference decoding; a new shape gets its own."""
    cap = captioner(kind)
    dec = StaticDecoder(cap, static=True)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    first = dec.generate(x).tolist()
    step = dec._steps[(5, 3 + 12)]
    assert dec.generate(y).tolist() == cap.generate(y).tolist()
    assert dec.generate(x).tolist() == first == cap.generate(x).tolist()
    assert dec._steps == {(5, 15): step}
    dec.generate(x[:2])
    assert set(dec._steps) == {(5, 15), (2, 15)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph step needs a GPU")
@pytest.mark.cuda
def test_cuda_graph_is_captured_once_per_shape():
    cap = captioner("gpt2").cuda()
    dec = StaticDecoder(cap, cuda_graph=True)
    x, y = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    dec.generate(x)
    graph = dec._steps[(4, 15)].graph
    assert dec.generate(y).tolist() == cap.generate(y).tolist()
    assert dec._steps[(4, 15)].graph is graph


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
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
    with torch.no_grad():  # a weight update reaches the captured graph (it reads the live weights)
        for p in gpu.lm.parameters():
            p.mul_(1.01)
    again = rollout_step(gpu, img.cuda(), cfg, step=3, decoder=decoder)
    assert torch.equal(again.tokens, rollout_step(gpu, img.cuda(), cfg, step=3).tokens)
    with autocast(torch.device("cuda"), torch.bfloat16):  # bf16 rollouts through the graph run
        rollout_step(gpu, img.cuda(), cfg, step=3, decoder=decoder)
