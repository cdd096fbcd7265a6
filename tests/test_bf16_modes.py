"""Every mode once under bf16 autocast on the CPU (the precision a GPU role runs in): a DiscriTune update with
hard distractors and LoRA adapters, beam and select evaluation, and a Gumbel update through a real
GPT-2-BPE-to-CLIP-BPE token map. Each checks what must stay fp32 (log-probs, rewards, embeddings that become
logits, the weights the optimizer updates) and that gradients are finite."""
import json

import open_clip
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.config import RunConfig, load_config
from raycap.data import distractors
from raycap.local_trainer import LocalTrainer
from raycap.models.bpe import train_bpe
from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.rl import algorithm
from world_runs import world_sets


def test_discritune_with_hard_distractors_lora_beam_and_select_under_bf16(tiny_world_dir, tmp_path):
    cfg = load_config("world-demo", [*world_sets(tiny_world_dir), "runtime.precision=bf16", "runtime.device=cpu",
                                     "rl.batch_size=12", "rl.reward.num_candidates=12", "rl.reward.hard_distractors=3",
                                     "rl.sampling.max_new_tokens=8", "eval.images=100", "eval.select_samples=4",
                                     "captioner.lora.r=4", "captioner.lora.alpha=8", "threads=2"])
    trainer = LocalTrainer(cfg, tmp_path / "run", log=lambda *a: None)
    assert trainer.models.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in before)
    stats = trainer.update(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float)), stats
    after = dict(trainer.policy.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # fp32 master weights
    assert any(not torch.equal(before[n], after[n]) for n in before)
    _, img, cands = trainer.scorer.batch(1)
    assert cands[:, 1:4].ne(cands[:, :1]).all()  # hard distractors, never the target
    with trainer.models.autocast():
        caps = algorithm.rollout(trainer.policy, img, cfg, 1)
        scores = trainer.scorer.score(cands, caps.tokens, caps.lengths, 1)
        logits = trainer.policy.logits(img, caps.tokens)
    assert caps.logprobs.dtype == scores.reward.dtype == logits.dtype == torch.float32
    for decoding in ("beam", "select"):
        metrics = trainer.evaluate("val", decoding)
        assert 0.0 <= metrics["p_at_1"] <= 1.0, (decoding, metrics)


def real_bpe_retriever(path) -> Retriever:
    """A tiny open_clip CLIP with the real 49,408-token CLIP BPE (its vocabulary ships with open_clip)."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(open_clip.CLIP(**cfg).state_dict(), str(path / "open_clip_model.safetensors"))
    return Retriever.from_open_clip(f"local-dir:{path}").eval().freeze()


def test_gumbel_through_a_real_gpt2_to_clip_token_map_under_bf16(tmp_path):
    text = ["a large green star at top left", "a small red circle and a blue square", "an orange triangle"] * 20
    tok = train_bpe(text, vocab_size=400)
    retriever = real_bpe_retriever(tmp_path)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                    eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    policy = ClipCap(ClipCapConfig(clip_dim=32, prefix_length=3, lm={}, eos_token_id=tok.eos_token_id,
                                   max_new_tokens=8), lm=lm)
    reference = ClipCap(policy.config, lm=GPT2LMHeadModel(lm.config)).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    images = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    cfg = RunConfig.model_validate({"rl": {"method": "gumbel", "batch_size": 8, "sampling": {"max_new_tokens": 8},
                                           "reward": {"num_candidates": 8, "hard_distractors": 2}}})
    scorer = algorithm.Scorer(retriever, images, tok, policy.stop_ids, cfg)
    assert not scorer.token_map.identity
    batch = torch.arange(8)
    cands = distractors.candidates(batch, images, 2, 0.99, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = algorithm.gumbel_loss(policy, reference, scorer, images[batch], cands, tok.eos_token_id, cfg, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.mapper.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
