"""Issue 15's numbered correctness fixes, each checked on its effect: device-independent sampling, the sampled
KL's gradient, the tempered policy's REINFORCE gradient, the off-policy importance correction (these three by
exact enumeration of every caption of a tiny captioner), the first running-mean baseline, one reward scale,
complete candidate rows, whole images per learner rank, and the self-check's length bias."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from raycap.config import load_config
from raycap.data import distractors
from raycap.errors import UserError
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.decoding import sample_next
from raycap.rl import algorithm, baselines, losses, rewards
from raycap.rl.self_check import self_check

V, EOS, MAX_NEW = 4, 3, 3


def tiny(seed: int) -> ClipCap:
    torch.manual_seed(seed)
    lm = dict(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, eos_token_id=EOS, bos_token_id=EOS)
    return ClipCap(ClipCapConfig(clip_dim=8, prefix_length=2, lm=lm, eos_token_id=EOS, max_new_tokens=MAX_NEW)).eval()


def all_captions():
    """Every caption the tiny captioner can produce: stopped by EOS at 1..MAX_NEW tokens, or cut at MAX_NEW."""
    rows = []
    for n in range(1, MAX_NEW + 1):
        for body in itertools.product(range(EOS), repeat=n - 1):
            rows.append(list(body) + [EOS])
    rows += [list(b) for b in itertools.product(range(EOS), repeat=MAX_NEW)]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.tensor([r + [0] * (MAX_NEW - len(r)) for r in rows])
    return tokens, lengths


def seq_logprob(model, img, tokens, lengths, temperature=1.0):
    lp = losses.token_logprobs(model.logits(img, tokens) / temperature, tokens)
    return lp, losses.sequence_logprob(lp, lengths)


def flat_grad(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def caption_reward(tokens, lengths):
    """An arbitrary fixed reward per caption (depends on its tokens and length)."""
    return ((tokens * torch.tensor([1.0, -0.5, 0.25])[:tokens.shape[1]]).sum(1) + 0.3 * lengths).float()


def test_enumeration_covers_every_caption():
    model, img = tiny(0), torch.randn(1, 8)
    tokens, lengths = all_captions()
    _, logp = seq_logprob(model, img, tokens, lengths, 0.7)
    assert float(logp.detach().exp().sum()) == pytest.approx(1.0, abs=1e-5)


# -- 1. sampling on any device ------------------------------------------------------------------------------

class GeneratorUse(TorchFunctionMode):
    """Records every torch call that is handed a generator together with tensor inputs: such a call runs on the
    inputs' device, and a CPU generator on a CUDA tensor is the crash this guards against."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None and any(isinstance(a, torch.Tensor) for a in args):
            self.bad.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def test_sampling_draws_its_noise_with_factories_only_so_a_cpu_generator_never_meets_a_cuda_tensor():
    model, img = tiny(0), torch.randn(5, 8)
    with GeneratorUse() as mode:
        model.generate(img, mode="sample", temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert mode.bad == []
    # the draw is moved to the logits' device: on the meta device (no data) nothing is computed on the CPU
    nxt, lp = sample_next(torch.zeros(4, 7, device="meta"), 0.7, torch.Generator().manual_seed(0))
    assert nxt.device.type == "meta" and lp.device.type == "meta"


def test_sampled_captions_follow_the_tempered_policy_and_report_its_logprobs():
    model, img = tiny(1), torch.randn(1, 8)
    tokens, lengths = all_captions()
    _, logp = seq_logprob(model, img, tokens, lengths, 0.7)
    caps = model.generate(img, mode="sample", temperature=0.7, num_samples=20000,
                          generator=torch.Generator().manual_seed(0))
    index = {tuple(t[:n].tolist()): i for i, (t, n) in enumerate(zip(tokens, lengths.tolist()))}
    counts = torch.zeros(len(tokens))
    for row in caps.tolist():
        counts[index[tuple(row)]] += 1
    assert 0.5 * (counts / counts.sum() - logp.exp()).abs().sum() < 0.02  # total variation
    # the rollout's log-probs are the tempered policy's, as the learner recomputes them by teacher forcing
    _, again = seq_logprob(model, img, caps.tokens[:50], caps.lengths[:50], 0.7)
    torch.testing.assert_close(losses.sequence_logprob(caps.logprobs[:50], caps.lengths[:50]), again,
                               atol=1e-4, rtol=1e-4)
    # same seed, same captions, whatever the batch's float precision of the sampling noise
    again = model.generate(img, mode="sample", temperature=0.7, num_samples=20000,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, caps.tokens)


# -- 2. the sampled KL's gradient ---------------------------------------------------------------------------

def expected_kl_gradients(estimator):
    """E_{c ~ policy}[grad estimator(c)] and E[grad kl_full(c)], exactly, by weighting every caption by its
    (detached) probability under the policy."""
    policy, reference, img = tiny(0), tiny(7), torch.randn(1, 8)
    with torch.no_grad():  # a reference far from the policy, where the forward and reverse KL differ
        reference.lm.lm_head.weight.mul_(8.0)
    tokens, lengths = all_captions()
    logits = policy.logits(img, tokens)
    token_lp = losses.token_logprobs(logits, tokens)
    logp = losses.sequence_logprob(token_lp, lengths)
    weight = logp.detach().exp()
    ref_logits = reference.logits(img, tokens).detach()
    exact = flat_grad((weight * losses.kl_full(logits, ref_logits, lengths)).sum(), policy)
    sampled = flat_grad((weight * estimator(token_lp, losses.token_logprobs(ref_logits, tokens), lengths)).sum(),
                        policy)
    return sampled, exact


def k3(policy_lp, ref_lp, lengths):
    d = ref_lp - policy_lp
    return ((d.exp() - d - 1) * losses.token_mask(lengths, d.shape[1])).sum(1)


def test_sampled_kl_has_the_exact_kl_gradient_in_expectation():
    sampled, exact = expected_kl_gradients(losses.kl_sampled)
    torch.testing.assert_close(sampled, exact, atol=1e-6, rtol=1e-4)
    wrong, exact = expected_kl_gradients(k3)  # the estimator raycap used before: the forward KL's gradient
    assert (wrong - exact).norm() > 0.1 * exact.norm()  # measured: 27% off


# -- 3. temperature ------------------------------------------------------------------------------------------

def test_reinforce_gradient_is_the_tempered_policys_at_temperature_0_7():
    policy, img = tiny(2), torch.randn(1, 8)
    tokens, lengths = all_captions()
    cfg = load_config("world-demo", ["rl.sampling.temperature=0.7", "rl.algorithm.kl_coef=0",
                                     "rl.algorithm.baseline=none"])
    R = caption_reward(tokens, lengths)
    _, logp = seq_logprob(policy, img, tokens, lengths, 0.7)
    objective = flat_grad((logp.exp() * R).sum(), policy)  # grad of E_{c ~ pi_T}[R(c)]
    # the expected REINFORCE gradient: each caption's loss term weighted by its sampling probability
    advantages = R * logp.detach().exp() * len(R)
    loss, _ = algorithm.reinforce_loss(policy, policy, img, tokens, lengths, advantages, cfg)
    torch.testing.assert_close(-flat_grad(loss, policy), objective, atol=1e-6, rtol=1e-4)


# -- 4. off-policy correction --------------------------------------------------------------------------------

def test_importance_correction_brings_a_lagged_update_closer_to_the_on_policy_one():
    behaviour, policy, img = tiny(3), tiny(3), torch.randn(1, 8)
    with torch.no_grad():  # one "update" later: the policy has moved away from the behaviour policy
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens, lengths = all_captions()
    R = caption_reward(tokens, lengths)
    mu_tokens, mu = seq_logprob(behaviour, img, tokens, lengths)
    mu_tokens, mu = mu_tokens.detach(), mu.detach().exp()
    _, pi = seq_logprob(policy, img, tokens, lengths)
    on_policy = -flat_grad(-(pi.detach().exp() * R * pi).sum(), policy)  # E_pi[R grad log pi]

    def lagged(cap, behaviour_logprobs):
        cfg = load_config("world-demo", ["rl.algorithm.kl_coef=0", "rl.algorithm.baseline=none",
                                         f"rl.algorithm.importance_ratio_cap={cap}"])
        loss, stats = algorithm.reinforce_loss(policy, policy, img, tokens, lengths, R * mu * len(R), cfg,
                                               behaviour_logprobs)
        return -flat_grad(loss, policy), stats

    uncorrected, _ = lagged(2.0, None)
    corrected, stats = lagged(2.0, mu_tokens)
    untruncated, _ = lagged(1e30, mu_tokens)
    torch.testing.assert_close(untruncated, on_policy, atol=1e-6, rtol=1e-4)
    assert (corrected - on_policy).norm() < 0.5 * (uncorrected - on_policy).norm()
    assert stats["importance_ratio_max"] > 1 and 0 < stats["importance_ratio_mean"]


# -- 5. first running-mean baseline --------------------------------------------------------------------------

def test_running_mean_starts_at_the_first_batchs_mean():
    ema = baselines.RunningMean(momentum=0.9)
    r = torch.tensor([-4.0, -3.0, -5.0])
    assert ema(r).tolist() == [-4.0, -4.0, -4.0]  # a baseline of 0 would push all three captions down
    assert ema(torch.tensor([-2.0])).tolist() == [-4.0]
    assert ema.value == pytest.approx(0.9 * -4.0 + 0.1 * -2.0)


# -- 6. one reward scale -------------------------------------------------------------------------------------

def test_cosine_reward_and_cosine_term_share_the_logit_scale():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    cands = torch.tensor([[0, 1]])
    got = rewards.compute("cosine", text, images, cands, logit_scale=20.0)
    assert got.item() == pytest.approx(20.0 / math.sqrt(2))
    assert rewards.cosine(text, images[:1], 20.0).item() == pytest.approx(got.item())


# -- 7. candidate rows and learner shards --------------------------------------------------------------------

def test_candidate_rows_are_complete_when_hard_distractors_are_left_out():
    torch.manual_seed(0)
    pool = F.normalize(torch.randn(50, 4), dim=-1)
    batch = torch.arange(6)
    # 10 candidates from a batch of 6 + 5 hard: a target with fewer than 5 usable neighbours used to crash
    rows = distractors.candidates(batch, pool, k_hard=5, max_cos=-0.8, num_candidates=10,
                                  generator=torch.Generator().manual_seed(0))
    assert rows.shape == (6, 10)
    assert all(len(set(r.tolist())) == 10 for r in rows) and torch.equal(rows[:, 0], batch)
    nearest = distractors.nearest(batch, pool, 5, -0.8)
    assert (nearest < 0).any()  # some targets have fewer than 5 usable hard distractors
    for r, near in zip(rows, nearest):  # the usable hard distractors come first, then random images
        found = near[near >= 0]
        assert torch.equal(r[1:1 + len(found)], found)
        assert bool((pool[found] @ pool[r[0]] <= -0.8 + 1e-6).all())


def test_hard_distractors_are_the_targets_nearest_images_in_the_rows():
    torch.manual_seed(0)
    pool = F.normalize(torch.randn(200, 8), dim=-1)
    batch = torch.arange(0, 200, 10)
    rows = distractors.candidates(batch, pool, k_hard=3, max_cos=0.99, num_candidates=20,
                                  generator=torch.Generator().manual_seed(0))
    for b, row in zip(batch, rows):
        sims = pool @ pool[b]
        sims[b] = -2
        assert set(row[1:4].tolist()) == set(sims.topk(3).indices.tolist())


def test_a_distractor_curriculum_moves_from_random_to_medium_to_hard_neighbours():
    """rl.reward.curriculum: each stage's candidates hold its hard distractors past its skipped nearest images;
    the batch the scorer hands an update follows the stage of that update, and the last stage lasts."""
    torch.manual_seed(0)
    pool = F.normalize(torch.randn(300, 8), dim=-1)
    cfg = load_config("world-demo", ["rl.batch_size=20", "rl.reward.num_candidates=20", "rl.reward.near_duplicate=1",
                                     "rl.reward.curriculum=[{updates: 2}, {updates: 3, hard_distractors: 4, "
                                     "skip_nearest: 10}, {updates: 1, hard_distractors: 4}]"])
    assert [cfg.rl.reward.distractors_at(s) for s in (0, 1, 2, 4, 5, 9)] == [(0, 0), (0, 0), (4, 10), (4, 10),
                                                                              (4, 0), (4, 0)]
    scorer = algorithm.Scorer.__new__(algorithm.Scorer)
    scorer.images, scorer.inputs, scorer.cfg = pool, pool, cfg

    def ranks(step):
        """Each distractor's rank among its target's nearest images (0: the nearest), per row."""
        idx, _, cands = scorer.batch(step)
        out = []
        for b, row in zip(idx, cands):
            sims = pool @ pool[b]
            sims[b] = -2
            order = sims.argsort(descending=True).tolist()
            out.append([order.index(i) for i in row[1:].tolist()])
        return torch.tensor(out)

    random, medium, hard = ranks(0), ranks(3), ranks(7)
    assert (medium[:, :4] >= 10).all() and (medium[:, :4] < 14).all()  # ranks 10-13: past the 10 nearest
    assert sorted(hard[0, :4].tolist()) == [0, 1, 2, 3]
    assert random.float().mean() > 100 and (random > 3).float().mean() > 0.9  # the batch's others, rarely near
    with pytest.raises(UserError, match="curriculum.1..hard_distractors .20. must be < reward.num_candidates"):
        load_config("world-demo", ["rl.batch_size=20", "rl.reward.num_candidates=20",
                                   "rl.reward.curriculum=[{updates: 2}, {updates: 3, hard_distractors: 20}]"])
    with pytest.raises(UserError, match="the stages before the last take 5 updates, rl.steps is 4"):
        load_config("world-demo", ["rl.steps=4", "rl.reward.curriculum=[{updates: 5}, {updates: 1}]"])
    with pytest.raises(UserError, match="leave reward.hard_distractors at 0"):
        load_config("world-demo", ["rl.reward.hard_distractors=5", "rl.reward.curriculum=[{updates: 2}]"])


def test_learner_ranks_take_whole_images_or_the_config_is_refused():
    from raycap.runtime.controller import shards

    with pytest.raises(UserError, match="learner_workers"):
        load_config("world-demo", ["rl.batch_size=10", "rl.reward.num_candidates=10", "rl.sampling.num_samples=2",
                                   "rl.algorithm.baseline=loo",
                                   "runtime.learner_workers=4"])
    cfg = load_config("world-demo", ["rl.batch_size=8", "rl.reward.num_candidates=8", "rl.sampling.num_samples=2",
                                     "rl.algorithm.baseline=loo",
                                     "runtime.learner_workers=4"])
    model = tiny(0)
    img = torch.randn(cfg.rl.batch_size, 8)
    tokens = torch.randint(0, V, (cfg.rl.batch_size * cfg.rl.sampling.num_samples, 3))
    for i, t in zip(shards(img, 4), shards(tokens, 4)):
        assert model.logits(i, t).shape[:2] == t.shape  # each rank's images match its rows


# -- 8. self-check length bias -------------------------------------------------------------------------------

def test_self_check_has_no_length_bias():
    """Two captions that beat each of their word swaps by the same margin score the same, whatever their
    number of variants (3 for a three-word caption, 10 for five words)."""
    def encode(texts):
        # the caption itself matches the image with cos 1, every variant with cos 0.5
        return torch.stack([torch.tensor([1.0, 0.0]) if t in ("a b c", "a b c d e")
                            else torch.tensor([0.5, math.sqrt(0.75)]) for t in texts])

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    short, long = self_check(["a b c", "a b c d e"], image, encode, logit_scale=4.0).tolist()
    assert short == pytest.approx(long) and short == pytest.approx(math.log(2) + F.logsigmoid(torch.tensor(2.0)).item())
