"""LoRA on the captioner's LM (issue 27, item 6): `captioner.lora` adds seeded adapters through peft, only they and
the mapper train and move by weight sync, and a LoRA captioner saves merged as a plain captioner directory whose
logits equal the adapted model's."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.config import RunConfig
from raycap.errors import UserError
from raycap.models import lora
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.loading import load_captioner_model
from raycap.roles import build_role_models
from raycap.runtime.weights import flat_weights, load_flat_weights


def tiny_clipcap(seed=0):
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    return ClipCap(ClipCapConfig(clip_dim=16, prefix_length=3, lm={}, max_new_tokens=6), lm=lm).eval()


def lora_config(world, **lora_settings):
    return RunConfig.model_validate({
        "data": {"path": str(world)}, "retriever": {"path": str(world / "retriever")},
        "captioner": {"path": str(world / "captioner"), "lora": {"r": 4, "alpha": 8, **lora_settings}}})


def test_only_adapters_and_mapper_train_and_move(tiny_world_dir):
    cfg = lora_config(tiny_world_dir)
    policy = build_role_models(cfg, "cpu").policy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mapper.") or "lora_" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    plain = build_role_models(cfg.model_copy(update={"captioner": cfg.captioner.model_copy(update={"lora": None})}),
                              "cpu").policy
    mapper = sum(p.numel() for p in plain.mapper.parameters())
    adapters = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert flat_weights(policy).size == mapper + adapters < flat_weights(plain).size
    # two copies of a policy (learner, rollout worker) get the same adapters without sharing a random stream
    torch.manual_seed(123)
    again = build_role_models(cfg, "cpu").policy
    for (n, a), (_, b) in zip(policy.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    # the adapters start as a no-op: the policy scores like the captioner it was loaded from
    img, tokens = torch.randn(3, plain.config.clip_dim), torch.randint(0, 20, (3, 5))
    assert torch.allclose(policy.logits(img, tokens), plain.logits(img, tokens), atol=1e-6)


def test_a_lora_captioner_saves_merged_as_a_plain_captioner(tmp_path):
    model = tiny_clipcap()
    lora.add_lora(model.lm, r=4, alpha=8)
    model.set_trainable(True)
    with torch.no_grad():  # move the adapters away from their no-op start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    img, tokens = torch.randn(4, 16), torch.randint(0, 50, (4, 6))
    adapted = model.logits(img, tokens)
    assert not torch.allclose(adapted, tiny_clipcap().logits(img, tokens), atol=1e-3)  # the adapters do something
    model.save_pretrained(tmp_path / "cap")
    loaded = load_captioner_model(tmp_path / "cap").eval()
    assert not lora.has_lora(loaded) and lora.has_lora(model)  # saving merged a copy, the policy keeps adapters
    assert torch.allclose(loaded.logits(img, tokens), adapted, atol=1e-5)
    # flat weights address the same parameters in every copy: a copy with other adapters takes these over
    other = tiny_clipcap()
    lora.add_lora(other.lm, r=4, alpha=8, seed=1)
    other.set_trainable(True)
    load_flat_weights(other, flat_weights(model))
    assert torch.allclose(other.logits(img, tokens), adapted, atol=1e-6)


def test_lora_settings_are_checked():
    with pytest.raises(UserError, match="target_modules"):
        lora.add_lora(tiny_clipcap().lm, r=2, alpha=4, target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="rl.optimiser.train_lm"):
        RunConfig.model_validate({"captioner": {"lora": {"r": 4}}, "rl": {"optimiser": {"train_lm": False}}})
    with pytest.raises(ValueError, match="r"):
        RunConfig.model_validate({"captioner": {"lora": {"r": 0}}})
