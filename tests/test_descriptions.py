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
