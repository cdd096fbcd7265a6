import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.errors import UserError
from raycap.models.captioner import Captions
from raycap.models.clipcap import ClipCap, ClipCapConfig

CLIP_DIM, P, V, EOS = 16, 4, 50, 2
LM = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2,
          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=EOS)


def make(seed=0, **kw) -> ClipCap:
    torch.manual_seed(seed)
    kw.setdefault("max_new_tokens", 12)
    return ClipCap(ClipCapConfig(clip_dim=CLIP_DIM, prefix_length=P, lm=dict(LM), **kw)).eval()


def images(n=4, seed=1):
    return torch.randn(n, CLIP_DIM, generator=torch.Generator().manual_seed(seed))


def assert_same(a: Captions, b: Captions, atol=1e-5):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=1e-4)


def check_layout(c: Captions, pad=0):
    """Padding/zero log-probs after each length, finite non-positive log-probs before it."""
    T = c.tokens.size(1)
    assert T == int(c.lengths.max())
    valid = torch.arange(T)[None] < c.lengths[:, None]
    assert (c.tokens[~valid] == pad).all() and (c.logprobs[~valid] == 0).all()
    assert (c.logprobs[valid] <= 0).all() and torch.isfinite(c.logprobs).all()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threading only adds overhead (and contention on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module", params=["eos_only", "many_stops"])
def any_model(request):
    """The plain model, and one whose frequent tokens also stop captions (rows finish at different steps)."""
    return make() if request.param == "eos_only" else make(stop_token_ids=[4, 9, 14, 46])


def test_shapes_and_layout(model):
    x = images()
    assert model.prefix(x).shape == (4, P, 32)
    for mode in ("greedy", "sample", "beam"):
        c = model.generate(x, mode=mode, num_beams=3, generator=torch.Generator().manual_seed(0))
        assert c.tokens.shape[0] == 4 and c.tokens.dtype == torch.long and c.lengths.dtype == torch.long
        assert c.lengths.max() <= 12 and c.lengths.min() >= 1
        check_layout(c)
        for row, n in zip(c.tokens, c.lengths):  # a caption is cut exactly at its first stop token
            stops = (row[:n] == EOS).nonzero()
            assert (n == 12 and len(stops) == 0) or (len(stops) == 1 and stops[0, 0] == n - 1)
        empty = model.generate(x, mode=mode, num_beams=3, max_new_tokens=0)
        assert empty.tokens.shape == empty.logprobs.shape == (4, 0) and (empty.lengths == 0).all()


def test_greedy_equals_beam1(any_model):
    x = images(6)
    assert_same(any_model.generate(x), any_model.generate(x, mode="beam", num_beams=1))


@pytest.mark.parametrize("kw", [dict(mode="greedy"), dict(mode="beam", num_beams=3),
                                dict(mode="beam", num_beams=4, num_samples=2), dict(mode="sample", num_samples=3)])
def test_cache_equals_no_cache(any_model, kw):
    x = images(6)
    a = any_model.generate(x, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = any_model.generate(x, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert_same(a, b)
    check_layout(a)


def test_sampling_reproducible_and_temperature(model):
    x = images(3)
    g = lambda: torch.Generator().manual_seed(7)
    assert_same(model.generate(x, mode="sample", generator=g()), model.generate(x, mode="sample", generator=g()))
    # near-zero temperature collapses to greedy (the log-probs are the tempered policy's: near 0)
    cold, greedy = model.generate(x, mode="sample", temperature=1e-4, generator=g()), model.generate(x)
    assert torch.equal(cold.tokens, greedy.tokens) and torch.equal(cold.lengths, greedy.lengths)
    assert cold.logprobs.abs().max() < 1e-3
    # higher temperature -> more diverse first tokens and higher average surprisal
    lo = model.generate(x[:1], mode="sample", temperature=0.3, num_samples=200, generator=g(), max_new_tokens=1)
    hi = model.generate(x[:1], mode="sample", temperature=3.0, num_samples=200, generator=g(), max_new_tokens=1)
    assert hi.tokens[:, 0].unique().numel() > lo.tokens[:, 0].unique().numel() + 5
    assert hi.logprobs[:, 0].mean() < lo.logprobs[:, 0].mean() - 0.5


def test_num_samples_layout(model):
    x = images(2)
    c = model.generate(x, mode="sample", num_samples=3, generator=torch.Generator().manual_seed(3))
    assert c.tokens.shape[0] == 6
    # rows are image-major: scoring with the per-image embeddings repeated reproduces the log-probs
    torch.testing.assert_close(model.log_probs(x, c.tokens, c.lengths), c.logprobs, atol=1e-5, rtol=1e-4)
    other = model.log_probs(x.flip(0).repeat_interleave(3, 0), c.tokens, c.lengths)
    assert not torch.allclose(other, c.logprobs, atol=1e-3)


def test_stop_tokens(model, tmp_path):
    x = images(6)
    base = model.generate(x)
    stop = int(base.tokens[0, 2])  # a token the greedy decode produces mid-caption
    model.save_pretrained(tmp_path)
    stopped = ClipCap.from_pretrained(tmp_path, stop_token_ids=[stop]).eval().generate(x)
    for i in range(6):
        row, n = base.tokens[i, : base.lengths[i]], int(base.lengths[i])
        hit = (row == stop).nonzero()
        exp = int(hit[0, 0]) + 1 if len(hit) else n
        assert stopped.lengths[i] == exp
        assert torch.equal(stopped.tokens[i, :exp], row[:exp])
        assert (stopped.tokens[i, exp:] == 0).all()
        torch.testing.assert_close(stopped.logprobs[i, :exp], base.logprobs[i, :exp])
    assert stopped.lengths[0] <= 3 and (stopped.lengths < base.lengths).any()
    check_layout(stopped)
    # greedy rows that run to max_new_tokens have exactly that length; trimmed to the longest row
    short = model.generate(x, max_new_tokens=3)
    assert short.tokens.shape[1] == int(short.lengths.max()) <= 3
    assert torch.equal(short.tokens, base.tokens[:, :3].masked_fill(torch.arange(3)[None] >= short.lengths[:, None], 0))


def test_log_probs_manual_and_generate(model):
    x = images(3)
    c = model.generate(x, mode="beam", num_beams=3)
    toks, lens = c.tokens, c.lengths
    wte = model.lm.get_input_embeddings()
    with torch.no_grad():
        logits = model.lm(inputs_embeds=torch.cat([model.prefix(x), wte(toks)], 1)).logits
    manual = F.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, toks[..., None]).squeeze(-1)
    manual = manual * (torch.arange(toks.size(1))[None] < lens[:, None])
    lp = model.log_probs(x, toks, lens)
    torch.testing.assert_close(lp, manual, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp, c.logprobs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.log_probs(x, toks, lens, reduction="sum"), manual.sum(1))
    torch.testing.assert_close(model.log_probs(x, toks, lens, reduction="mean"), manual.sum(1) / lens)
    c = model.generate(x, mode="greedy")
    torch.testing.assert_close(model.log_probs(x, c.tokens, c.lengths), c.logprobs, atol=1e-5, rtol=1e-4)
    c = model.generate(x, mode="sample", temperature=1.5, generator=torch.Generator().manual_seed(0))
    tempered = F.log_softmax(model.logits(x, c.tokens) / 1.5, -1).gather(-1, c.tokens[..., None]).squeeze(-1)
    tempered = tempered * (torch.arange(c.tokens.size(1))[None] < c.lengths[:, None])
    torch.testing.assert_close(tempered, c.logprobs, atol=1e-5, rtol=1e-4)


def test_beam_is_exhaustive_when_wide():
    """With num_beams = vocab and 2 steps, beam search must find the best sequence of all V + V^2 candidates."""
    m = make(max_new_tokens=2)
    x = images(2)
    c = m.generate(x, mode="beam", num_beams=V, num_samples=3)
    t1 = torch.arange(V).repeat_interleave(V)
    seqs = torch.stack([t1, torch.arange(V).repeat(V)], 1)
    lens = torch.where(t1 == EOS, 1, 2)
    for i in range(2):
        with torch.no_grad():
            scores = m.log_probs(x[i : i + 1], seqs, lens, reduction="sum")
        scores[(t1 == EOS) & (seqs[:, 1] != 0)] = float("-inf")  # one copy of the length-1 caption
        best = scores.topk(3).values
        got = c.logprobs[3 * i : 3 * i + 3].sum(1)
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)
        assert (got[:-1] >= got[1:]).all()


def test_gradients():
    x = images(2)
    toks = torch.randint(3, V, (2, 5))
    lens = torch.tensor([5, 3])
    m = make(train_lm=True)
    m.log_probs(x, toks, lens, reduction="mean").sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mapper.parameters())
    assert m.lm.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    m = make(train_lm=False).train()
    assert not m.lm.training and m.mapper.training
    assert not any(p.requires_grad for p in m.lm.parameters())
    m.log_probs(x, toks, lens, reduction="sum").sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mapper.parameters())
    assert all(p.grad is None for p in m.lm.parameters())


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_save_load_roundtrip(tmp_path, mapper):
    m = make(mapper=mapper, mapper_layers=2, clip_length=3, stop_token_ids=[7], train_lm=False)
    m.save_pretrained(tmp_path)
    assert {"raycap_clipcap.json", "mapper.safetensors", "lm"} <= {p.name for p in tmp_path.iterdir()}
    assert any((tmp_path / "lm").glob("*.safetensors"))
    assert json.loads((tmp_path / "raycap_clipcap.json").read_text())["kind"] == "clipcap"
    m2 = ClipCap.from_pretrained(tmp_path).eval()
    assert m2.config == m.config
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = images(3)
    for kw in (dict(mode="greedy"), dict(mode="beam", num_beams=3)):
        assert_same(m.generate(x, **kw), m2.generate(x, **kw), atol=0)
    assert ClipCap.from_pretrained(tmp_path, max_new_tokens=3).generate(x).tokens.shape[1] <= 3


def test_load_errors(tmp_path, model):
    with pytest.raises(UserError, match="is not a raycap ClipCap checkpoint: missing raycap_clipcap.json"):
        ClipCap.from_pretrained(tmp_path)
    (tmp_path / "raycap_clipcap.json").write_text(json.dumps({"kind": "other", "clip_dim": 4}))
    with pytest.raises(ValueError, match="not a raycap ClipCap checkpoint.*kind 'other'"):
        ClipCap.from_pretrained(tmp_path)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    (d / "mapper.safetensors").unlink()
    with pytest.raises(UserError, match=re.escape(f"{d} is not a raycap ClipCap checkpoint: missing mapper.")):
        ClipCap.from_pretrained(d)
    model.save_pretrained(d)
    for f in (d / "lm").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="missing LM weights"):
        ClipCap.from_pretrained(d)
    with pytest.raises(ValueError, match="unknown mapper"):
        make(mapper="lstm")
    with pytest.raises(ValueError, match="unknown decoding mode"):
        model.generate(images(1), mode="nucleus")


def test_from_original_clipcap_mlp(tmp_path):
    src = make(seed=0)
    sd = {f"clip_project.{k}": v for k, v in src.mapper.state_dict().items()}
    sd |= {f"gpt.{k}": v for k, v in src.lm.state_dict().items()}
    assert "clip_project.model.0.weight" in sd and "gpt.lm_head.weight" in sd and "gpt.transformer.wte.weight" in sd
    sd["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # buffer saved by old transformers versions
    torch.save(sd, tmp_path / "coco_weights.pt")
    cfg = ClipCapConfig(clip_dim=CLIP_DIM, prefix_length=P, lm=dict(LM), max_new_tokens=12)
    torch.manual_seed(123)  # different init: equality below must come from the loaded weights
    m = ClipCap.from_original_clipcap(tmp_path / "coco_weights.pt", cfg).eval()
    x = images(3)
    torch.testing.assert_close(m.prefix(x), src.prefix(x), atol=0, rtol=0)
    for kw in (dict(mode="greedy"), dict(mode="beam", num_beams=3)):
        assert_same(m.generate(x, **kw), src.generate(x, **kw), atol=0)
    sd["clip_project.model.4.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"unexpected \['model.4.weight'\]"):
        ClipCap.from_original_clipcap(tmp_path / "bad.pt", cfg)
    del sd["clip_project.model.4.weight"], sd["gpt.transformer.h.1.mlp.c_fc.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        ClipCap.from_original_clipcap(tmp_path / "bad.pt", cfg)


def _original_transformer_mapper(sd, x, clip_length, heads=8):
    """Forward pass of the original ClipCap TransformerMapper, written out from its state dict."""
    h = F.linear(x, sd["linear.weight"], sd["linear.bias"]).view(x.size(0), clip_length, -1)
    h = torch.cat([h, sd["prefix_const"].expand(x.size(0), -1, -1)], 1)
    b, n, c = h.shape
    i = 0
    while f"transformer.layers.{i}.norm1.weight" in sd:
        p = lambda k: sd[f"transformer.layers.{i}.{k}"]
        y = F.layer_norm(h, (c,), p("norm1.weight"), p("norm1.bias"))
        q = F.linear(y, p("attn.to_queries.weight")).reshape(b, n, heads, c // heads)
        kv = F.linear(y, p("attn.to_keys_values.weight")).reshape(b, n, 2, heads, c // heads)
        att = (torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // heads) ** -0.5).softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, kv[:, :, 1]).reshape(b, n, c)
        h = h + F.linear(out, p("attn.project.weight"), p("attn.project.bias"))
        y = F.layer_norm(h, (c,), p("norm2.weight"), p("norm2.bias"))
        y = F.relu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
        h = h + F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        i += 1
    return h[:, clip_length:]


def test_from_original_clipcap_transformer(tmp_path):
    src = make(seed=0)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    H, L = 32, 3
    msd = {"linear.weight": r(L * H, CLIP_DIM), "linear.bias": r(L * H), "prefix_const": r(P, H)}
    for i in range(2):
        msd |= {f"transformer.layers.{i}.{k}": v for k, v in {
            "norm1.weight": 1 + r(H), "norm1.bias": r(H), "attn.to_queries.weight": r(H, H),
            "attn.to_keys_values.weight": r(2 * H, H), "attn.project.weight": r(H, H), "attn.project.bias": r(H),
            "norm2.weight": 1 + r(H), "norm2.bias": r(H), "mlp.fc1.weight": r(2 * H, H), "mlp.fc1.bias": r(2 * H),
            "mlp.fc2.weight": r(H, 2 * H), "mlp.fc2.bias": r(H)}.items()}
    sd = {f"clip_project.{k}": v for k, v in msd.items()} | {f"gpt.{k}": v for k, v in src.lm.state_dict().items()}
    torch.save(sd, tmp_path / "transformer.pt")
    cfg = ClipCapConfig(clip_dim=CLIP_DIM, prefix_length=P, mapper="transformer", mapper_layers=2, clip_length=L,
                        lm=dict(LM))
    m = ClipCap.from_original_clipcap(tmp_path / "transformer.pt", cfg).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(m.prefix(x), _original_transformer_mapper(msd, x, L), atol=1e-5, rtol=1e-4)
    bad = cfg.__class__(**{**cfg.__dict__, "mapper_layers": 3})
    with pytest.raises(ValueError, match="missing"):
        ClipCap.from_original_clipcap(tmp_path / "transformer.pt", bad)


def test_transformer_mapper():
    m = make(mapper="transformer", mapper_layers=2, clip_length=3)
    x = images(3)
    assert m.prefix(x).shape == (3, P, 32)
    c = m.generate(x, mode="beam", num_beams=2)
    check_layout(c)
    assert_same(c, m.generate(x, mode="beam", num_beams=2, use_cache=False))
    lp = m.log_probs(x, c.tokens, c.lengths)
    torch.testing.assert_close(lp, c.logprobs, atol=1e-5, rtol=1e-4)
    lp.sum().backward()
    assert m.mapper.prefix_const.grad.abs().sum() > 0 and m.mapper.linear.weight.grad.abs().sum() > 0


def test_lm_from_local_path(tmp_path):
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**LM))
    lm.save_pretrained(tmp_path / "gpt")
    m = ClipCap(ClipCapConfig(clip_dim=CLIP_DIM, prefix_length=P, lm=str(tmp_path / "gpt"), max_new_tokens=5)).eval()
    assert torch.equal(m.lm.transformer.wte.weight, lm.transformer.wte.weight)
    assert m.stop_ids == [EOS]  # eos taken from the LM config
    c = m.generate(images(2))
    assert c.tokens.shape[0] == 2 and c.lengths.max() <= 5
    m.save_pretrained(tmp_path / "ckpt")
    assert_same(ClipCap.from_pretrained(tmp_path / "ckpt").eval().generate(images(2)), c, atol=0)


def test_public_clipcap_checkpoint_layout_loads(tmp_path):
    """A state dict with exactly the key names and shapes of the public `coco_weights.pt` /
    `conceptual_weights.pt` (MLP mapper, prefix 10, ViT-B/32's 512-d embedding, GPT-2 124M with the attention
    buffers old transformers saved), random values: it loads through the real loader (torch.load with
    weights_only=True) with lm="gpt2" and no download, and the model computes with exactly those weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config())  # the architecture of "gpt2" (124M)
    sd = {f"gpt.{k}": v for k, v in gpt.state_dict().items()}
    for i in range(12):
        sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    shapes = {"clip_project.model.0.weight": (3840, 512), "clip_project.model.0.bias": (3840,),
              "clip_project.model.2.weight": (7680, 3840), "clip_project.model.2.bias": (7680,)}
    sd |= {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    assert sd["gpt.transformer.wte.weight"].shape == (50257, 768) and sd["gpt.lm_head.weight"].shape == (50257, 768)
    assert len(sd) == 4 + 2 + 12 * 14 + 2 + 1  # mapper, wte/wpe, 12 blocks (12 tensors + 2 buffers), ln_f, head
    torch.save(sd, tmp_path / "coco_weights.pt")
    del gpt
    m = ClipCap.from_original_clipcap(tmp_path / "coco_weights.pt",
                                      ClipCapConfig(clip_dim=512, prefix_length=10, lm="gpt2")).eval()
    assert m.lm.transformer.wte.weight.data_ptr() == m.lm.lm_head.weight.data_ptr()  # tied, as GPT-2
    assert torch.equal(m.lm.transformer.h[11].mlp.c_proj.weight, sd["gpt.transformer.h.11.mlp.c_proj.weight"])
    x = torch.randn(2, 512)
    want = (torch.tanh(x @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
            @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]).view(2, 10, 768)
    torch.testing.assert_close(m.prefix(x), want, atol=1e-5, rtol=1e-5)
    assert m.generate(x, max_new_tokens=3).tokens.shape == (2, 3)


def test_token_mapper_reads_patch_tokens(tmp_path):
    """image_input 'tokens': (B, T, W) patch tokens through the token mapper; decoding and teacher forcing agree,
    every mapper weight gets gradient, the checkpoint round-trips, and a wrong shape or an MLP is refused."""
    T, W = 5, 12
    torch.manual_seed(0)
    m = ClipCap(ClipCapConfig(clip_dim=W, prefix_length=P, mapper="transformer", mapper_layers=2, clip_length=T,
                              image_input="tokens", lm=dict(LM), max_new_tokens=8)).eval()
    assert m.reads_image_tokens and not make().reads_image_tokens
    x = torch.randn(3, T, W, generator=torch.Generator().manual_seed(2))
    assert m.prefix(x).shape == (3, P, 32)
    c = m.generate(x, mode="sample", generator=torch.Generator().manual_seed(3), num_samples=2)
    check_layout(c)
    lp = m.log_probs(x, c.tokens, c.lengths)  # 3 images, 6 rows: the num_samples layout
    torch.testing.assert_close(lp, c.logprobs, atol=1e-5, rtol=1e-4)
    lp.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mapper.parameters())
    # where a token sits matters: the same tokens in another order give another prefix
    assert not torch.allclose(m.prefix(x), m.prefix(x.flip(1)), atol=1e-4)
    m.save_pretrained(tmp_path)
    m2 = ClipCap.from_pretrained(tmp_path).eval()
    assert m2.config == m.config and m2.reads_image_tokens
    assert_same(m.generate(x), m2.generate(x), atol=0)
    with pytest.raises(ValueError, match=r"reads \(B, 5, 12\) image tokens, got \(3, 12\)"):
        m.prefix(x[:, 0])
    with pytest.raises(ValueError, match="needs mapper 'transformer'"):
        make(image_input="tokens")
    with pytest.raises(ValueError, match="unknown image_input"):
        make(image_input="pixels")
