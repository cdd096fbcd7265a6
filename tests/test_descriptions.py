import numpy as np
import torch

from raycap.data import descriptions as D
from raycap.data.grammar import analyse, parse
from raycap.data.world import World
from raycap.metrics.retrieval import candidate_sets, p_at_1, target_wins

WORLD = World({"n_train": 400, "n_val": 50, "n_test": 200})


def test_render_is_the_inverse_of_parse():
    rng = np.random.default_rng(0)
    for i in range(200):
        s = WORLD.scene("train", i)
        for d in (D.full(s), D.partial(s, rng)):
            assert parse(D.render(d)) == d
            assert analyse(D.render(d), s).faithful


def test_negatives_are_false_and_distinct():
    rng = np.random.default_rng(1)
    swaps = 0
    for i in range(200):
        s = WORLD.scene("train", i)
        pos = D.full(s)
        negs = D.negatives(pos, s, WORLD.config, rng, 3)
        assert len(negs) == 3 and len(set(negs)) == 3 and pos not in negs
        for n in negs:
            r = analyse(D.render(n), s)
            assert r.wellformed and not r.faithful
            swaps += sorted(m.colour for m in n) == sorted(m.colour for m in pos) and n != pos
    assert swaps > 50  # many negatives exchange attributes between objects (binding), not just change one


def test_binding_variants_swap_one_attribute_between_two_objects():
    s = next(WORLD.scene("test", i) for i in range(200) if len(WORLD.scene("test", i).objects) == 3)
    variants = D.binding_variants(s)
    assert variants and len(set(variants)) == len(variants)
    for v in variants:
        r = analyse(v, s)
        assert r.wellformed and not r.faithful and r.n_claims - r.n_true == 2


def test_truth_table_agrees_with_the_grammar():
    rng = np.random.default_rng(2)
    scenes = [WORLD.scene("train", i) for i in range(40)]
    descs = [D.partial(s, rng) for s in scenes] + [D.full(s) for s in scenes[:10]]
    table = D.TruthTable(WORLD.config)(descs, scenes)
    expected = np.array([[analyse(D.render(d), s).faithful for s in scenes] for d in descs])
    assert np.array_equal(table, expected)
    assert table.sum() > len(descs)  # partial descriptions fit other images too


def test_candidate_sets_and_p_at_1():
    c = candidate_sets(150, 100, seed=0)
    assert c.shape == (150, 100) and torch.equal(c[:, 0], torch.arange(150))
    assert all(len(set(row.tolist())) == 100 for row in c)
    assert torch.equal(c, candidate_sets(150, 100, seed=0))
    emb = torch.nn.functional.normalize(torch.randn(150, 8), dim=-1)
    assert p_at_1(emb, emb, c) == 1.0
    # a tie with a distractor is a miss
    tied = emb.clone()
    tied[int(c[0, 5])] = tied[0]
    assert not bool(target_wins(emb, tied, c)[0])


def test_hard_distractors_exclude_the_target_and_near_duplicates():
    from raycap.data.distractors import candidates, nearest

    torch.manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    pool[1] = torch.nn.functional.normalize(pool[0] + 0.01 * torch.randn(16), dim=0)  # near-duplicate of 0
    pool[2] = torch.nn.functional.normalize(pool[0] + 0.9 * torch.randn(16), dim=0)  # similar, not a duplicate
    targets = torch.tensor([0, 5, 7])
    hard = nearest(targets, pool, k=4, max_cos=0.8, chunk=64)  # chunks smaller than the pool: exact merge
    sims = pool[targets] @ pool.T
    for row, t in zip(hard, targets):
        assert int(t) not in row.tolist() and bool((sims[targets.tolist().index(int(t)), row] <= 0.8).all())
    assert 1 not in hard[0].tolist() and 2 in hard[0].tolist()
    masked = sims.masked_fill(sims > 0.8, -2).clone()
    masked[torch.arange(3), targets] = -2
    assert torch.equal(hard, masked.topk(4, dim=1).indices)
    batch = torch.arange(100, 200)
    c = candidates(batch, pool, k_hard=5, generator=torch.Generator().manual_seed(0))
    assert c.shape == (100, 100) and torch.equal(c[:, 0], batch)
    assert all(len(set(r.tolist())) == 100 for r in c)
    twins = torch.nn.functional.normalize(torch.ones(300, 16), dim=-1)  # all near-duplicates: random stand-ins
    assert bool((nearest(batch[:2], twins, k=3) == -1).all())
    c = candidates(batch, twins, k_hard=5, generator=torch.Generator().manual_seed(0))
    assert all(len(set(r.tolist())) == 100 and set(r.tolist()) == set(batch.tolist()) for r in c)
    plain = candidates(batch)
    assert sorted(plain[3].tolist()) == batch.tolist()
