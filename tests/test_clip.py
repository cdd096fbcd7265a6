import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from raycap.data.world import World
from raycap.errors import UserError
from raycap.models.clip import Retriever
from raycap.models.tokenizers import decode, encode, world_tokenizer

WORLD = World({"n_train": 100, "n_val": 20, "n_test": 20})


@pytest.fixture(scope="module")
def retriever():
    torch.manual_seed(0)
    return Retriever.for_world(world_tokenizer(WORLD.config.vocabulary())).eval()


def test_world_tokenizer_round_trip_and_eos_is_the_highest_id():
    tok = world_tokenizer(WORLD.config.vocabulary())
    caps = [WORLD.scene("test", i).full_description for i in range(5)] + ["some shapes"]
    ids, lengths = encode(tok, caps)
    assert tok.eos_token_id == len(tok) - 1 and tok.pad_token_id == 0
    assert all(ids[i, lengths[i] - 1] == tok.eos_token_id for i in range(len(caps)))
    assert decode(tok, ids, lengths) == caps
    assert encode(tok, ["a red circle at top left"], max_length=3)[0].tolist() == [[tok.convert_tokens_to_ids("a"),
                                                                                     tok.convert_tokens_to_ids("red"),
                                                                                     tok.eos_token_id]]


def test_text_at_batch_length_equals_open_clip_at_full_context(retriever):
    ids = retriever.tokenize([WORLD.scene("test", i).full_description for i in range(6)])
    assert ids.shape[1] < retriever.context_length
    full = torch.zeros(ids.shape[0], retriever.context_length, dtype=torch.long)
    full[:, : ids.shape[1]] = ids
    torch.testing.assert_close(retriever.encode_text(ids), retriever.model.encode_text(full, normalize=True))


def test_soft_tokens_match_hard_tokens_and_carry_gradient(retriever):
    ids = retriever.tokenize(["a red circle", "a large blue star at top left"])
    one_hot = F.one_hot(ids, len(retriever.tokenizer)).float().requires_grad_(True)
    soft = retriever.encode_soft_tokens(one_hot, ids.argmax(-1))
    torch.testing.assert_close(soft, retriever.encode_text(ids))
    soft.sum().backward()
    assert one_hot.grad.abs().sum() > 0


def test_image_encoder_on_world_pixels(retriever):
    emb = retriever.encode_image(retriever.pixels(WORLD.images("test", range(4))))
    assert emb.shape == (4, retriever.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_save_load_round_trip(retriever, tmp_path):
    retriever.save_pretrained(tmp_path / "r")
    back = Retriever.from_pretrained(tmp_path / "r")
    px = retriever.pixels(WORLD.images("test", range(3)))
    torch.testing.assert_close(back.encode_image(px), retriever.encode_image(px))
    caps = ["a red circle", "some shapes"]
    torch.testing.assert_close(back.encode_captions(caps), retriever.encode_captions(caps))
    torch.testing.assert_close(back.logit_scale, retriever.logit_scale)


def test_bad_checkpoint_dirs_give_clear_errors(retriever, tmp_path):
    with pytest.raises(UserError, match="missing raycap_retriever.json"):
        Retriever.from_pretrained(tmp_path)
    retriever.save_pretrained(tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing model.safetensors"):
        Retriever.from_pretrained(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "raycap_retriever.json").read_text())
    (tmp_path / "r" / "raycap_retriever.json").write_text(json.dumps({**meta, "kind": "clipcap"}))
    with pytest.raises(UserError, match="expected 'retriever'"):
        Retriever.from_pretrained(tmp_path / "r")


def test_open_clip_model_from_a_local_dir(tmp_path):
    """The real-model path (open_clip name/dir + its BPE tokenizer) on a tiny model saved locally."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    r = Retriever.from_open_clip(f"local-dir:{tmp_path}").eval()
    ids = r.tokenize(["a photo of a cat", "a dog"])
    assert ids.shape[1] < 77 and int(ids.argmax(-1)[1]) == 3  # <sot> a dog <eot>
    full = open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a photo of a cat", "a dog"])
    torch.testing.assert_close(r.encode_text(ids), model.eval().encode_text(full, normalize=True))
    emb = r.encode_image(r.pixels(WORLD.images("test", range(2))))  # 48 px resized to the model's 32
    assert emb.shape == (2, 32)
    r.save_pretrained(tmp_path / "saved")
    back = Retriever.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(back.encode_text(ids), r.encode_text(ids))


def test_real_tokenizer_by_path_gets_a_pad_token(tmp_path):
    """A GPT-2-style byte-level BPE tokenizer saved locally loads through the by-name/path code."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from raycap.models.tokenizers import load_tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a red circle at top left", "a small blue star"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "gpt2tok"))
    tok = load_tokenizer(tmp_path / "gpt2tok")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    ids, lengths = encode(tok, ["a red circle", "a small blue star at top left"])
    assert decode(tok, ids, lengths) == ["a red circle", "a small blue star at top left"]
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_image_tokens_are_the_towers_penultimate_tokens(retriever):
    """encode_image_tokens: the class token and one token per patch as they enter the ViT's last block (whose
    class token output, normed and projected, is the embedding), without touching the tower."""
    px = retriever.pixels(WORLD.images("test", range(3)))
    visual = retriever.model.visual
    with torch.no_grad():
        tokens = retriever.encode_image_tokens(px)
        last = visual.transformer.resblocks[-1](tokens)
    assert retriever.token_shape == (37, 96) and tokens.shape == (3, 37, 96)
    torch.testing.assert_close(retriever.encode_image(px, normalize=False), visual.ln_post(last[:, 0]) @ visual.proj)
    assert torch.equal(retriever.encode_pixels_tokens(WORLD.images("test", range(3)), chunk=2), tokens)


def test_a_resnet_tower_has_no_patch_tokens():
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                           text_cfg={"context_length": 8, "vocab_size": 40, "width": 16, "heads": 2, "layers": 1})
    r = Retriever(model, world_tokenizer(WORLD.config.vocabulary()), {"name": "tiny-rn"})
    with pytest.raises(UserError, match="tiny-rn: its image tower \\(ModifiedResNet\\) gives no patch tokens"):
        r.token_shape
