import math

import pytest
import torch
import torch.nn.functional as F

from raycap.data.world import World
from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.tokenizers import world_tokenizer
from raycap.rl import baselines, losses, rewards
from raycap.rl.gumbel import gumbel_decode
from raycap.rl.self_check import self_check, word_swaps


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_rewards_against_a_hand_computation():
    images = unit([1, 0], [0, 1], [1, 1])
    texts = unit([1, 0], [0, 1])
    cands = torch.tensor([[0, 1, 2], [1, 0, 2]])
    scale = 10.0
    c = 1 / math.sqrt(2)
    # caption 0 vs images 0,1,2: cos 1, 0, c ; caption 1 vs images 1,0,2: cos 1, 0, c
    expected = 10 * 1 - math.log(math.exp(10) + math.exp(0) + math.exp(10 * c))
    got = rewards.compute("discriminative", texts, images, cands, scale)
    torch.testing.assert_close(got, torch.tensor([expected, expected]))
    torch.testing.assert_close(rewards.compute("accuracy", texts, images, cands, scale), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(rewards.compute("cosine", unit([1, 1], [1, 0]), images, cands, scale),
                               torch.tensor([10 * c, 0.0]))  # the retriever's logits: scale * cos


def test_accuracy_counts_a_tie_as_a_miss():
    images = unit([1, 0], [1, 0], [0, 1])
    assert rewards.accuracy(unit([1, 0]), images, torch.tensor([[0, 1, 2]])).item() == 0.0


def test_nan_reward_is_an_error_naming_the_batch():
    texts = torch.tensor([[float("nan"), 0.0]])
    with pytest.raises(FloatingPointError, match="batch 7"):
        rewards.compute("discriminative", texts, unit([1, 0], [0, 1]), torch.tensor([[0, 1]]), 1.0, batch=7)


def test_word_swaps_are_distinct_and_exclude_the_caption():
    assert word_swaps("a red square") == ["red a square", "square red a", "a square red"]
    assert word_swaps("blue blue") == [] and word_swaps("one") == []
    assert "a b a" not in word_swaps("a b a") and len(word_swaps("a b a")) == 2  # "b a a", "a a b"
    sub = word_swaps("w1 w2 w3 w4 w5 w6", max_variants=4, generator=torch.Generator().manual_seed(0))
    assert len(sub) == 4 and set(sub) <= set(word_swaps("w1 w2 w3 w4 w5 w6"))


def test_self_check_against_a_hand_computation():
    table = {"red square": [1.0, 0.0], "square red": [0.6, 0.8], "x": [0.0, 1.0]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    image = unit([1, 0], [0, 1])
    got = self_check(["red square", "x"], image, encode, logit_scale=5.0)
    # caption 0 vs its one swap: cos 1.0 vs 0.6; caption 1 has no variant and scores 0
    expected = 5 * 1.0 - math.log(math.exp(5 * 1.0) + math.exp(5 * 0.6)) + math.log(2)
    torch.testing.assert_close(got, torch.tensor([expected, 0.0]))
    swapped_better = self_check(["square red"], unit([0.6, 0.8]), encode, 5.0)
    assert swapped_better.item() > 0 > self_check(["red square"], unit([0.6, 0.8]), encode, 5.0).item()


def test_running_mean_baseline_uses_only_past_rewards():
    ema = baselines.RunningMean(momentum=0.5)
    assert ema(torch.tensor([2.0, 4.0])).tolist() == [3.0, 3.0]  # nothing seen yet: its own mean
    assert ema(torch.tensor([0.0])).tolist() == [3.0]
    assert ema.value == pytest.approx(1.5)
    win = baselines.RunningMean(momentum=None, window=2)
    for r in ([1.0], [3.0], [5.0]):
        win(torch.tensor(r))
    assert win.value == pytest.approx(4.0)
    restored = baselines.RunningMean(momentum=None, window=2)
    restored.load_state_dict(win.state_dict())
    assert restored(torch.tensor([0.0])).tolist() == [4.0]


def test_best_of_n_baseline_leaves_a_one_hot_advantage():
    r = torch.tensor([1.0, 3.0, 2.0, -1.0, -1.0, -4.0])
    torch.testing.assert_close(r - baselines.best_of_n(r, 3), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="needs >= 2 samples"):
        baselines.best_of_n(r, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        baselines.best_of_n(r, 4)


def test_leave_one_out_and_self_critical():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two images, three samples each
    torch.testing.assert_close(baselines.leave_one_out(r, 3), torch.tensor([4.0, 3.5, 1.5, 1.5, 1.5, 0.0]))
    torch.testing.assert_close(baselines.self_critical(torch.tensor([0.5, -1.0]), 2),
                               torch.tensor([0.5, 0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        baselines.leave_one_out(r, 1)


def tiny_captioner(seed=0, vocab=12, eos=11):
    torch.manual_seed(seed)
    lm = dict(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, eos_token_id=eos, bos_token_id=eos)
    return ClipCap(ClipCapConfig(clip_dim=8, prefix_length=2, lm=lm, eos_token_id=eos, max_new_tokens=6)).eval()


def test_reinforce_gradient_is_advantage_times_grad_log_p():
    model = tiny_captioner()
    img = torch.randn(3, 8)
    caps = model.generate(img, mode="sample", generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss = losses.reinforce(model.log_probs(img, caps.tokens, caps.lengths), caps.lengths, adv)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(3):
        logp = model.log_probs(img[i:i + 1], caps.tokens[i:i + 1], caps.lengths[i:i + 1], reduction="sum").sum()
        for e, g in zip(expected, torch.autograd.grad(logp, params)):
            e -= adv[i] * g / 3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)


def test_kl_is_zero_at_the_reference_and_its_gradient_is_right():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 5, requires_grad=True)
    lengths = torch.tensor([4, 2])
    assert losses.kl_full(z, z.detach().clone(), lengths).abs().max() < 1e-6
    q = torch.randn(2, 4, 5)
    kl = losses.kl_full(z, q, lengths)
    kl.sum().backward()
    p, logp, logq = F.softmax(z, -1), F.log_softmax(z, -1), F.log_softmax(q, -1)
    per = (p * (logp - logq)).sum(-1, keepdim=True)
    analytic = p * (logp - logq - per) * (torch.arange(4)[None, :, None] < lengths[:, None, None])
    torch.testing.assert_close(z.grad, analytic.detach())
    same = torch.randn(3, 4)
    assert losses.kl_sampled(same, same.clone(), torch.tensor([4, 4, 1])).abs().max() < 1e-6


def test_gumbel_path_reaches_the_captioner_and_not_the_frozen_clip():
    world = World({"n_train": 50, "n_val": 10, "n_test": 10})
    tok = world_tokenizer(world.config.vocabulary())
    torch.manual_seed(0)
    clip = Retriever.for_world(tok).freeze()
    lm = dict(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2, eos_token_id=tok.eos_token_id)
    cap = ClipCap(ClipCapConfig(clip_dim=clip.embed_dim, prefix_length=2, lm=lm, eos_token_id=tok.eos_token_id,
                                max_new_tokens=8))
    img = clip.encode_image(clip.pixels(world.images("test", range(4))))
    soft = gumbel_decode(cap, img, tok.eos_token_id, tau=1.0)
    assert torch.equal(soft.probs.sum(-1)[torch.arange(4), soft.lengths - 1], torch.ones(4))
    assert bool((soft.tokens[torch.arange(4), soft.lengths - 1] == tok.eos_token_id).all())
    text = clip.encode_soft_tokens(soft.probs, soft.lengths - 1)
    # the soft captions encode exactly like their hard tokens
    torch.testing.assert_close(text, clip.encode_text(soft.tokens), atol=1e-5, rtol=1e-4)
    losses.clip_relevance(text, img).backward()
    assert sum(p.grad.abs().sum() for p in cap.mapper.parameters()) > 0
    assert sum(p.grad.abs().sum() for p in cap.lm.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in clip.parameters())


def test_substitution_check_by_hand():
    """Each content word against its best single-word substitute, mean over the caption's content words."""
    import math

    from raycap.rl.self_check import substitution_check, word_substitutions

    classes = [["red", "green"], ["circle", "star", "square"]]
    assert word_substitutions("a red circle", classes) == [["a green circle"], ["a red star", "a red square"]]
    assert word_substitutions("some shapes", classes) == []
    # a fake retriever: 2-d text embeddings, the image is (1, 0); cos = the first coordinate
    table = {"a red circle": [0.9, 0.1], "a green circle": [0.5, 0.5], "a red star": [0.95, 0.05],
             "a red square": [0.2, 0.8], "some shapes": [0.3, 0.7]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = 10.0
    got = substitution_check(["a red circle", "some shapes"], image, encode, s, classes)
    colour = math.log(1 / (1 + math.exp(-s * (0.9 - 0.5))))          # beats "green" by 0.4
    shape = math.log(1 / (1 + math.exp(-s * (0.9 - 0.95))))          # loses to "star" by 0.05
    assert got[0].item() == pytest.approx((colour + shape) / 2 + math.log(2), abs=1e-6)
    assert got[1].item() == 0.0  # no content word, nothing to check
    assert got[0] < math.log(2) and got[0] > 0  # one word supported, one contradicted


def test_substitution_check_needs_classes():
    from raycap.config import load_config
    from raycap.errors import UserError

    with pytest.raises(UserError, match="substitution_classes"):
        load_config("world-demo", ["rl.self_check.kind=substitute", "rl.self_check.substitution_classes=[]"])
    with pytest.raises(UserError, match="eval.decoding select .* needs rl.self_check.substitution_classes"):
        load_config("world-demo", ["rl.self_check.kind=swap", "rl.self_check.substitution_classes=[]",
                                   "rl.self_check.gate=false"])
    assert load_config("world-demo", ["rl.self_check.substitution_classes=[]", "rl.self_check.kind=swap",
                                      "eval.select_check=0", "rl.self_check.gate=false"]).eval.decoding == "select"
    cfg = load_config("world-demo", ["rl.self_check.kind=substitute",
                                     "rl.self_check.substitution_classes=[[red, green]]"])
    assert cfg.rl.self_check.substitution_classes == [["red", "green"]]


def test_phrase_grounding_by_hand():
    """The weakest phrase's log-softmax over the caption's candidates, each phrase scored alone."""
    from raycap.rl.rewards import phrase_grounding, split_phrases

    assert split_phrases("a red circle and a green star at top") == ["a red circle", "a green star at top"]
    assert split_phrases("some shapes") == ["some shapes"]
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # image 0 is the target of both captions
    table = {"a red circle": [1.0, 0.0], "a green star": [0.0, 1.0], "a red circle and a green star": [0.8, 0.6]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    cands = torch.tensor([[0, 1, 2], [0, 2, 1]])
    s = 5.0
    got = phrase_grounding(["a red circle and a green star", "a red circle"], encode, images, cands, s)
    # "a green star" alone: cosines with images 0, 1, 2 are 0, 1, 0.8 -> its log-softmax at the target is the minimum
    star = s * 0.0 - math.log(math.exp(0.0) + math.exp(s * 1.0) + math.exp(s * 0.8))
    circle = s * 1.0 - math.log(math.exp(s * 1.0) + math.exp(0.0) + math.exp(s * 0.6))
    assert got[0].item() == pytest.approx(star, abs=1e-5) and got[1].item() == pytest.approx(circle, abs=1e-5)
    assert star < circle  # the guessed second phrase is what the term charges


def test_pool_reward_against_a_hand_computation():
    """pool: log softmax at the target over every image of the pool, whatever the step's candidates are."""
    images = unit([1, 0], [0, 1], [1, 1], [-1, 0])
    texts = unit([1, 0], [1, 1])
    cands = torch.tensor([[0, 1], [2, 3]])  # two candidates each; the pool has four images
    scale, c = 10.0, 1 / math.sqrt(2)
    z0 = math.exp(10) + math.exp(0) + math.exp(10 * c) + math.exp(-10)
    z1 = math.exp(10 * c) + math.exp(10 * c) + math.exp(10) + math.exp(-10 * c)
    expected = torch.tensor([10 - math.log(z0), 10 - math.log(z1)])
    torch.testing.assert_close(rewards.compute("pool", texts, images, cands, scale), expected)
    # a claim that fits another pool image better costs the target, though that image is no candidate
    assert rewards.compute("pool", texts, images, cands, scale)[0] < \
        rewards.compute("discriminative", texts, images, torch.tensor([[0, 3]]), scale)[0]


def test_the_lean_full_kl_has_the_exact_gradient():
    """`kl_full` keeps only the two log-softmaxes for its backward pass (a hand-written gradient, computed a few
    captions at a time): it must be the true gradient (gradcheck, float64) and equal autograd's product rule."""
    torch.manual_seed(0)
    z = torch.randn(20, 5, 7, dtype=torch.float64, requires_grad=True)
    q = torch.log_softmax(torch.randn(20, 5, 7, dtype=torch.float64), -1)
    lengths = torch.randint(1, 6, (20,))
    assert torch.autograd.gradcheck(lambda x: losses.kl_full_from_logprobs(torch.log_softmax(x, -1), q, lengths), (z,))
    lp = torch.log_softmax(z, -1)
    plain = ((lp.exp() * (lp - q)).sum(-1) * losses.token_mask(lengths, 5)).sum(1)
    lean = losses.kl_full_from_logprobs(torch.log_softmax(z, -1), q, lengths)
    assert torch.allclose(plain, lean)
    g_plain, = torch.autograd.grad(plain.sum(), z)
    g_lean, = torch.autograd.grad(lean.sum(), z)
    assert torch.allclose(g_plain, g_lean)


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_accumulate_the_whole_batch_gradient(micro):
    """`reinforce_backward` over micro-batches of images (each with all its samples) gives the loss, statistics
    and gradients of one `reinforce_loss` over the whole batch, calling backward once per micro-batch, and its
    forward passes run inside the given context."""
    import contextlib
    import copy

    from raycap.config import load_config
    from raycap.rl import algorithm

    cfg = load_config("world-demo", ["rl.sampling.num_samples=2", "rl.algorithm.baseline=mean",
                                     f"rl.optimiser.micro_batch={micro}",
                                     "rl.batch_size=6", "rl.reward.num_candidates=6", "rl.algorithm.entropy_coef=0.01"])
    policy = tiny_captioner(seed=1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # a policy away from its reference, so the KL term has a gradient
        for p in policy.mapper.parameters():
            p.add_(0.05 * torch.randn_like(p))
    img = torch.randn(6, 8)
    caps = policy.generate(img, mode="sample", num_samples=2, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(12, generator=torch.Generator().manual_seed(1))
    params = [p for p in policy.parameters() if p.requires_grad]
    full, full_stats = algorithm.reinforce_loss(policy, reference, img, caps.tokens, caps.lengths, adv, cfg)
    want = torch.autograd.grad(full, params)
    calls, entered = [], []

    @contextlib.contextmanager
    def forward_context():
        entered.append(1)
        yield

    loss, stats = algorithm.reinforce_backward(policy, reference, img, caps.tokens, caps.lengths, adv, cfg, 0,
                                               lambda part: (calls.append(1), part.backward()), forward_context)
    assert len(calls) == len(entered) == 6 // micro
    torch.testing.assert_close(loss, full.detach(), atol=1e-6, rtol=1e-5)
    for key in ("kl", "entropy", "advantage_std"):
        assert stats[key] == pytest.approx(full_stats[key], rel=1e-5, abs=1e-7), key
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("rollout, temperature", [("sample", 0.7), ("greedy", 1.0)])
def test_logprob_drift_is_zero_on_policy_and_shows_a_decoder_that_drifted(rollout, temperature):
    """The decoder's token log-probs (under the tempered policy when sampled, the model's own when greedy) against
    the learner's teacher-forced ones of the same tokens: ~0 under the same weights, large under other weights."""
    import copy

    from raycap.config import load_config
    from raycap.rl import algorithm

    cfg = load_config("world-demo", [f"rl.sampling.rollout={rollout}", f"rl.sampling.temperature={temperature}",
                                     "rl.algorithm.baseline=mean", "rl.sampling.num_samples=1", "rl.batch_size=6",
                                     "rl.reward.num_candidates=6"])
    policy = tiny_captioner(seed=1)
    img = torch.randn(6, 8)
    caps = algorithm.rollout(policy, img, cfg, step=0)
    drifted = copy.deepcopy(policy)
    with torch.no_grad():
        for p in drifted.mapper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    drift = {}
    for name, learner in (("same", policy), ("drifted", drifted)):
        _, stats = algorithm.reinforce_loss(learner, policy, img, caps.tokens, caps.lengths, torch.zeros(6), cfg,
                                            rollout_logprobs=caps.logprobs)
        drift[name] = stats["logprob_drift"], stats["logprob_drift_max"]
    assert drift["same"][0] < 1e-6 and drift["same"][1] < 1e-5
    assert drift["drifted"][0] > 1e-3 and drift["drifted"][1] >= drift["drifted"][0]


def test_changes_weights_tells_a_step_that_moved_the_trainable_weights_from_one_that_did_not():
    from raycap.rl import algorithm

    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    opt = torch.optim.Adam([model.weight], lr=1e-7)  # the paper's lr still shows
    model(torch.randn(3, 4)).sum().backward()
    assert algorithm.changes_weights(model, opt.step)
    assert not algorithm.changes_weights(model, lambda: None)  # a sync that moved nothing
    assert not algorithm.changes_weights(model, lambda: model.bias.data.add_(1.0))  # frozen weights do not count


def test_micro_batch_settings_are_checked_when_the_config_loads():
    from raycap.config import load_config
    from raycap.errors import UserError

    with pytest.raises(UserError, match=r"rl.optimiser.micro_batch \(7\) must divide the images of a learner rank"):
        load_config("world-demo", ["rl.optimiser.micro_batch=7"])
    with pytest.raises(UserError, match="rl.optimiser.micro_batch splits DiscriTune"):
        load_config("world-demo", ["rl.optimiser.micro_batch=8", "rl.method=gumbel", "rl.self_check.gate=false"])


def test_the_gate_verifies_each_content_word_by_hand():
    """A caption is verified when it has a content word and every content word beats each of its substitutes (by
    more than the gate margin); one losing word (a red *circle* whose image the retriever finds more star-like)
    fails it."""
    from raycap.rl.self_check import substitution_margins, substitutions_passed

    classes = [["red", "green"], ["circle", "star", "square"]]
    table = {"a red circle": [0.9, 0.1], "a green circle": [0.5, 0.5], "a red star": [0.95, 0.05],
             "a red square": [0.2, 0.8], "a green star": [0.96, 0.04], "some shapes": [0.3, 0.7]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    image = torch.tensor([[1.0, 0.0]] * 3)
    margins = substitution_margins(["a red circle", "a red star", "some shapes"], image, encode, 10.0, classes)
    torch.testing.assert_close(margins[0], torch.tensor([10.0 * (0.9 - 0.5), 10.0 * (0.9 - 0.95)]))
    torch.testing.assert_close(margins[1], torch.tensor([10.0 * (0.95 - 0.96), 10.0 * (0.95 - 0.9)]))
    assert margins[2].numel() == 0
    assert substitutions_passed(margins).tolist() == [False, False, False]
    table["a green star"] = [0.6, 0.4]  # now "a red star" beats its colour and its shape substitutes
    margins = substitution_margins(["a red star"], image[:1], encode, 10.0, classes)
    assert substitutions_passed(margins).tolist() == [True]
    # its margins are 3.5 (colour) and 0.5 (shape): a gate margin of 0.4 passes it, 1.0 does not
    assert substitutions_passed(margins, 0.4).tolist() == [True]
    assert substitutions_passed(margins, 1.0).tolist() == [False]


def test_best_of_verified_and_the_gate_on_other_baselines():
    """best: each image imitates its best *verified* caption, none when no caption is; other baselines: a caption
    that failed the check keeps a negative advantage but never gets a positive one; gate_penalty pushes failed
    captions down."""
    from raycap.config import load_config
    from raycap.errors import UserError
    from raycap.rl.algorithm import Advantages

    rewards = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0])
    ok = torch.tensor([False, True, True, False, False, False])
    assert baselines.best_of_verified(rewards, ok, 3).tolist() == [0, 0, 1, 0, 0, 0]
    best = Advantages(load_config("world-demo", ["rl.sampling.num_samples=3", "rl.self_check.gate=true"]))
    assert best(rewards, verified=ok).tolist() == [0, 0, 1, 0, 0, 0]
    assert best(rewards).tolist() == [1, 0, 0, 1, 0, 0]  # ungated: the best of all
    mean = Advantages(load_config("world-demo", ["rl.sampling.num_samples=3", "rl.algorithm.baseline=mean",
                                                 "rl.self_check.gate=true"]))
    adv = mean(rewards, verified=ok)  # first batch: b = the batch mean 2.5
    assert adv.tolist() == [0.0, -1.5, -0.5, 0.0, 0.0, -2.5]
    # gate_penalty: a failed caption's advantage is -penalty under best, at most -penalty under the others
    penalised = ["rl.sampling.num_samples=3", "rl.self_check.gate=true", "rl.self_check.gate_penalty=0.25"]
    assert Advantages(load_config("world-demo", penalised))(rewards, verified=ok).tolist() == [
        -0.25, 0, 1, -0.25, -0.25, -0.25]
    adv = Advantages(load_config("world-demo", penalised + ["rl.algorithm.baseline=mean"]))(rewards, verified=ok)
    assert adv.tolist() == [-0.25, -1.5, -0.5, -0.25, -0.25, -2.5]
    for key in ("gate_margin", "gate_penalty"):
        with pytest.raises(UserError, match=f"self_check.{key} applies only with self_check.gate: true"):
            load_config("world-demo", ["rl.self_check.gate=false", f"rl.self_check.{key}=0.5"])
    with pytest.raises(UserError, match="method gumbel has no advantages to gate"):
        load_config("world-demo", ["rl.self_check.gate=true", "rl.method=gumbel", "rl.algorithm.baseline=mean",
                                   "rl.sampling.num_samples=1"])
    with pytest.raises(UserError, match="self_check.gate needs self_check.substitution_classes"):
        load_config("world-demo", ["rl.self_check.gate=true", "rl.self_check.substitution_classes=[]",
                                   "eval.select_check=0", "rl.self_check.kind=swap"])


def test_gumbel_uniforms_stay_inside_the_open_unit_interval_at_the_extreme_hashes():
    """The hash's extremes map strictly inside (0, 1), so the Gumbel noise -log(-log(u)) is finite for every
    element (2^-24 per element hit 1.0 before: a NaN loss nearly every update at GPT-2's vocabulary)."""
    from raycap.rl.gumbel import counter_uniform, unit_interval

    h = torch.tensor([0, 1, 511, 512, (1 << 32) - 1, (1 << 32) - 512, (1 << 32) - 513], dtype=torch.int64)
    u = unit_interval(h)
    assert bool(((u > 0) & (u < 1)).all()) and torch.isfinite(-torch.log(-torch.log(u))).all()
    a = counter_uniform((3, 70000), torch.Generator().manual_seed(0), "cpu")
    b = counter_uniform((3, 70000), torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(a, b) and abs(float(a.mean()) - 0.5) < 0.01 and a.unique().numel() > 200000
