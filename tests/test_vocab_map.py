"""The LM-to-CLIP token map for Gumbel captions: the identity in the world; between a locally trained BPE and
open_clip's real CLIP BPE (its vocabulary ships with open_clip), exact where the text re-tokenizes piece by
piece, and differentiable."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from raycap.models.bpe import train_bpe
from raycap.models.clip import Retriever
from raycap.models.vocab import build_token_map, caption_exactness, mapped_ids


@pytest.fixture(scope="module")
def real_bpe_retriever(tmp_path_factory):
    """A tiny open_clip CLIP with the real 49,408-token CLIP BPE tokenizer, saved and loaded as a local dir."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(open_clip.CLIP(**cfg).state_dict(), str(path / "open_clip_model.safetensors"))
    return Retriever.from_open_clip(f"local-dir:{path}").eval().freeze()


WORLD_TEXT = ["a large green star at top left", "a small red circle and a blue square at bottom", "some shapes",
              "an orange triangle at center", "a large white cross at top right and a small pink ring"] * 20


def test_identity_in_the_world_equals_the_shared_vocabulary_path(tiny_world_dir):
    r = Retriever.from_pretrained(tiny_world_dir / "retriever").freeze()
    m = build_token_map(r.tokenizer, r)
    assert m.identity and m.coverage()["mapped"] == 1.0
    ids = r.tokenize(["a red circle", "a large blue star at top left"])
    lengths = (ids != 0).sum(1)
    probs = torch.nn.functional.one_hot(ids, len(r.tokenizer)).float()
    x, eot = m.to_clip(probs, lengths, r.model.token_embedding.weight)
    torch.testing.assert_close(r.encode_soft_embeddings(x, eot), r.encode_soft_tokens(probs, lengths - 1))
    torch.testing.assert_close(r.encode_soft_embeddings(x, eot), r.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_bpe_to_real_clip_bpe_is_exact_where_it_covers_and_carries_gradient(real_bpe_retriever):
    r = real_bpe_retriever
    tok = train_bpe(WORLD_TEXT, vocab_size=600)
    m = build_token_map(tok, r, stop_ids=[tok.eos_token_id])
    cov = m.coverage()
    assert not m.identity and cov["mapped"] > 0.5 and m.prefix == [49406] and m.eot == 49407
    assert mapped_ids(m, tok("a red circle", add_special_tokens=False)["input_ids"]) == \
        [int(t) for t in r.tokenize(["a red circle"])[0] if int(t)]
    exact = [c for c in dict.fromkeys(WORLD_TEXT) if caption_exactness(m, tok, r, [c]) == 1.0]
    assert len(exact) >= 3  # whole-word BPE tokens: the world's words re-tokenize one to one
    E = r.model.token_embedding.weight
    rows = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in exact]
    T = max(map(len, rows))
    ids = torch.tensor([row + [tok.eos_token_id] * (T - len(row)) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])
    probs = torch.nn.functional.one_hot(ids, len(tok)).float().requires_grad_(True)
    x, eot = m.to_clip(probs, lengths, E)
    soft = r.encode_soft_embeddings(x, eot)
    torch.testing.assert_close(soft, r.encode_captions(exact), atol=1e-5, rtol=1e-4)
    soft.sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    # a word-continuing token cannot be exact: its text alone gets CLIP's end-of-word pieces
    assert cov["word_start"] < cov["mapped"]
    # a caption longer than the text tower's context is cut there, with the end of text last
    long = torch.nn.functional.one_hot(torch.tensor([ids[0].tolist()[:-1] * 40 + [tok.eos_token_id]]), len(tok)).float()
    x, eot = m.to_clip(long, torch.tensor([long.shape[1]]), E, max_length=77)
    assert x.shape[1] == 77 and int(eot[0]) == 76 and r.encode_soft_embeddings(x, eot).shape == (1, 32)
