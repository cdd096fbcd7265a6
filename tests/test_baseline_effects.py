"""Each baseline changes the advantages the way it claims, in a real update of the reference loop: the
self-critical baseline is the reward of the policy's own greedy caption of the same image, leave-one-out is
the mean reward of the image's other samples, best-of-n is one-hot on each image's best sample, the running mean
starts at the first batch's mean."""
import pytest
import torch

from raycap.config import load_config
from raycap.local_trainer import LocalTrainer
from raycap.rl import algorithm
from world_runs import world_sets


def one_update(world, tmp_path, monkeypatch, *overrides):
    cfg = load_config("world-demo", [*world_sets(world), "rl.batch_size=12", "rl.reward.num_candidates=12",
                                     "rl.sampling.max_new_tokens=8", "eval.images=100", "threads=2",
                                     "rl.sampling.num_samples=1",
                                     "rl.reward.kind=discriminative", "rl.reward.cosine_coef=0.2",
                                     "rl.self_check.gate=false", *overrides])  # each baseline's own advantages
    trainer = LocalTrainer(cfg, tmp_path)
    seen = {"scores": []}
    score, loss = algorithm.Scorer.score, algorithm.reinforce_loss

    def spy_score(self, *args, **kwargs):
        out = score(self, *args, **kwargs)
        seen["scores"].append(out.reward.clone())
        return out

    def spy_loss(policy, reference, img, tokens, lengths, advantages, cfg, *rest):
        seen["advantages"], seen["img"] = advantages.clone(), img.clone()
        return loss(policy, reference, img, tokens, lengths, advantages, cfg, *rest)

    monkeypatch.setattr(algorithm.Scorer, "score", spy_score)
    monkeypatch.setattr(algorithm, "reinforce_loss", spy_loss)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.update(0)
    return trainer, seen, before


def test_self_critical_baseline_is_the_greedy_captions_reward(tiny_world_dir, tmp_path, monkeypatch):
    trainer, seen, before = one_update(tiny_world_dir, tmp_path, monkeypatch, "rl.algorithm.baseline=greedy")
    sampled, greedy_used = seen["scores"]
    torch.testing.assert_close(seen["advantages"], sampled - greedy_used)
    # recompute the greedy captions of the policy as it was before the update, independently
    trainer.policy.load_state_dict(before)
    _, img, cands = trainer.scorer.batch(0)
    caps = trainer.policy.generate(img, mode="greedy")
    expected = score_without_spy(trainer, cands, caps)
    torch.testing.assert_close(greedy_used, expected)
    assert not torch.equal(sampled, greedy_used)


def score_without_spy(trainer, cands, caps):
    emb = trainer.retriever.encode_captions(trainer.scorer.texts(caps.tokens, caps.lengths))
    from raycap.rl import rewards

    task = rewards.compute("discriminative", emb, trainer.scorer.images, cands, trainer.scorer.logit_scale)
    return task + trainer.cfg.rl.reward.cosine_coef * rewards.cosine(emb, trainer.scorer.images[cands[:, 0]],
                                                           trainer.scorer.logit_scale)


def test_leave_one_out_leaves_each_caption_out(tiny_world_dir, tmp_path, monkeypatch):
    _, seen, _ = one_update(tiny_world_dir, tmp_path, monkeypatch, "rl.algorithm.baseline=loo",
                            "rl.sampling.num_samples=3")
    r = seen["scores"][0].view(12, 3)
    adv = seen["advantages"].view(12, 3)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        torch.testing.assert_close(adv[:, i], r[:, i] - r[:, others].mean(1))


def test_best_of_n_imitates_each_images_best_caption(tiny_world_dir, tmp_path, monkeypatch):
    """baseline=best: advantage 1 on the highest-reward caption of each image and 0 elsewhere, so the update's
    policy-gradient term is the cross-entropy of those captions alone."""
    _, seen, _ = one_update(tiny_world_dir, tmp_path, monkeypatch, "rl.algorithm.baseline=best",
                            "rl.sampling.num_samples=4",
                            "rl.reward.kind=pool")
    r = seen["scores"][0].view(12, 4)
    adv = seen["advantages"].view(12, 4)
    assert torch.equal(adv.sum(1), torch.ones(12)) and set(adv.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(r[adv.bool()], r.max(1).values)


def test_mean_baseline_first_update_is_centred(tiny_world_dir, tmp_path, monkeypatch):
    _, seen, _ = one_update(tiny_world_dir, tmp_path, monkeypatch, "rl.algorithm.baseline=mean")
    r = seen["scores"][0]
    torch.testing.assert_close(seen["advantages"], r - r.mean())
    assert seen["advantages"].mean().abs() < 1e-5 < r.mean().abs()


def test_hard_distractors_are_among_each_steps_candidates(tiny_world_dir, tmp_path):
    """With hard_distractors=3, columns 1-3 of every candidate row are the target's 3 nearest train images by
    CLIP image cosine below the near-duplicate threshold (random distractors otherwise)."""
    from raycap.data import distractors

    cfg = load_config("world-demo", [*world_sets(tiny_world_dir), "rl.batch_size=12", "rl.reward.num_candidates=12",
                                     "rl.reward.hard_distractors=3", "rl.reward.near_duplicate=1.0",
                                     "rl.sampling.max_new_tokens=8", "eval.images=100",
                                     "threads=2"])  # the tiny world's untrained images all look alike
    scorer = LocalTrainer(cfg, tmp_path).scorer
    idx, _, cands = scorer.batch(0)
    near = distractors.nearest(idx, scorer.images, 3, cfg.rl.reward.near_duplicate)
    assert bool((near >= 0).all())
    assert torch.equal(cands[:, 1:4], near) and torch.equal(cands[:, 0], idx)
    sims = scorer.images[idx] @ scorer.images.T
    sims[torch.arange(12), idx] = -2
    sims[sims > cfg.rl.reward.near_duplicate] = -2
    assert torch.equal(sims.topk(3).indices.sort(1).values, near.sort(1).values)


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_the_gate_imitates_only_verified_captions(tiny_world_dir, tmp_path, monkeypatch, margin):
    """self_check.gate with baseline best, in a real update: the imitated caption of each image is its best
    caption among those whose every content word beats its substitutes (by more than gate_margin) under the frozen
    retriever, recomputed here from the captions' texts."""
    from raycap.rl.self_check import substitution_margins, substitutions_passed

    texts = []
    score = algorithm.Scorer.score

    def keep_texts(self, *args, **kwargs):
        out = score(self, *args, **kwargs)
        texts.append((out.texts, out.verified))
        return out

    monkeypatch.setattr(algorithm.Scorer, "score", keep_texts)
    trainer, seen, _ = one_update(tiny_world_dir, tmp_path, monkeypatch, "rl.algorithm.baseline=best",
                                  "rl.sampling.num_samples=4", "rl.reward.kind=pool", "rl.self_check.gate=true",
                                  f"rl.self_check.gate_margin={margin}")
    (captions, passed), = texts
    idx, _, cands = trainer.scorer.batch(0)
    targets = trainer.scorer.images[cands[:, 0]].repeat_interleave(4, dim=0)
    classes = trainer.cfg.rl.self_check.substitution_classes
    margins = substitution_margins(captions, targets, trainer.retriever.encode_captions, trainer.scorer.logit_scale,
                                   classes)
    expected = substitutions_passed(margins, margin)
    assert torch.equal(passed, expected)
    r, adv, ok = seen["scores"][0].view(12, 4), seen["advantages"].view(12, 4), expected.view(12, 4)
    if margin:  # this batch's verified captions win by less than 1 logit: the margin refuses them, none is imitated
        assert substitutions_passed(margins).any() and not ok.any()
        assert not adv.any()
        return
    assert ok.any(1).any() and not ok.any(1).all()  # this batch has images with and without a verified caption
    assert torch.equal(adv.sum(1), ok.any(1).float())  # one imitated caption per image with a verified one
    assert not adv[~ok].any()  # never a caption that failed the check
    for i in range(12):
        if ok[i].any():
            assert r[i, adv[i].bool()].item() == r[i][ok[i]].max().item()
