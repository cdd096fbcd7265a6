import numpy as np
import pytest

from raycap.data import grammar
from raycap.data.world import GENERIC_CAPTIONS as GENERIC, PALETTE, World, WorldConfig, shape_mask
from raycap.errors import UserError

SMALL = {"n_train": 500, "n_val": 100, "n_test": 300}


def test_world_is_deterministic():
    a, b = World(SMALL), World(SMALL)
    for split in ("train", "val", "test"):
        for i in (0, 7, 99):
            assert a.scene(split, i) == b.scene(split, i)
            assert np.array_equal(a.image(split, i), b.image(split, i))
            assert a.references(split, i) == b.references(split, i)
    other = World({**SMALL, "seed": 1})
    assert any(a.scene("test", i) != other.scene("test", i) for i in range(10))
    assert not np.array_equal(a.image("train", 0), a.image("test", 0))


def test_labelled_split_is_a_small_prefix_of_train():
    w = World(SMALL)
    assert w.config.n_labelled == 10  # 2% of 500
    assert w.scene("labelled", 3) == w.scene("train", 3)
    with pytest.raises(IndexError):
        w.scene("labelled", 10)


def test_images_have_the_configured_shape_and_show_the_objects():
    w = World({**SMALL, "noise": 0})
    img = w.image("test", 0)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    colours = {tuple(PALETTE[o.colour]) for o in w.scene("test", 0).objects}
    # every object's colour appears (within its per-object jitter) somewhere in the image
    for c in colours:
        assert (np.abs(img.reshape(-1, 3).astype(int) - np.array(c)).max(axis=1) < 40).any()


def test_shapes_differ_from_each_other():
    y, x = np.mgrid[-1.2:1.2:48j, -1.2:1.2:48j]
    masks = {s: shape_mask(s, x, y) for s in WorldConfig().shapes}
    names = list(masks)
    for i, a in enumerate(names):
        assert masks[a].sum() > 100
        for b in names[i + 1:]:
            assert (masks[a] ^ masks[b]).sum() > 50, (a, b)


def test_every_generated_description_and_reference_parses_and_is_faithful():
    w = World(SMALL)
    scenes, full, refs = [], [], []
    for split in ("train", "test"):
        for i in range(300):
            s = w.scene(split, i)
            scenes.append(s)
            full.append(s.full_description)
            refs.append(w.references(split, i))
    counts = sorted({len(s.objects) for s in scenes})
    assert grammar.caption_checks(full, scenes) == {
        "wellformed": 1.0, "faithful": 1.0, "precision": 1.0, "recall": 1.0,
        "multi_object": pytest.approx(np.mean([len(s.objects) >= 2 for s in scenes])), "repetition": 0.0,
        **{f"faithful_{k}obj": 1.0 for k in counts}, "first_mention_faithful": 1.0,
        "claims_per_caption": pytest.approx(4 * np.mean([len(s.objects) for s in scenes]))}
    flat_refs = [r for rs in refs for r in rs]
    flat_scenes = [s for s, rs in zip(scenes, refs) for _ in rs]
    checks = grammar.caption_checks(flat_refs, flat_scenes)
    assert checks["wellformed"] == 1.0 and checks["faithful"] == 1.0 and checks["repetition"] == 0.0
    assert 0.10 <= checks["multi_object"] <= 0.20  # a minority (about 15%) name two objects
    assert checks["recall"] < 0.4  # vague: most details are dropped
    generic = np.mean([grammar.parse(r) == () for r in flat_refs])
    assert 0.05 <= generic <= 0.15


def test_vague_references_mostly_name_the_salient_object():
    w = World(SMALL)
    hits = []
    for i in range(200):
        s, sal = w.scene("train", i), w.scene("train", i).salient()
        for r in w.references("train", i):
            m = grammar.parse(r)
            if m and len(m) == 1:
                hits.append(grammar.bind(m, type(s)((sal,), s.grid)) == len(m[0].claims()))
    assert np.mean(hits) > 0.75


@pytest.mark.parametrize("field,value,needle", [
    ("image_size", -4, "image_size"), ("shapes", ["circle", "blob"], "blob"), ("colours", ["red", "mauve"], "mauve"),
    ("labelled_fraction", 1.5, "labelled_fraction"), ("max_objects", 12, "max_objects"), ("grid", 5, "grid"),
    ("n_test", 0, "n_test"), ("bogus", 1, "bogus"), ("ref_drop", {"texture": 0.1}, "texture"),
    ("ref_drop", {"size": 1.5}, "size: a chance between 0 and 1"), ("shape_scale", 0, "shape_scale")])
def test_bad_world_values_raise_one_line_errors_naming_the_field(field, value, needle):
    with pytest.raises(UserError) as e:
        WorldConfig.parse({field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_default_world_draws_what_it_drew_before_the_shift_fields():
    """Images and references of a v2 world, hashed with the code before `shape_scale` and `ref_drop` existed
    (commit 4e352e6): the defaults of the new fields draw the same pixels and the same words."""
    import hashlib
    import json

    w = World({"version": 2, "n_train": 500, "n_val": 100, "n_test": 300})
    pixels = hashlib.sha256()
    for i in range(8):
        pixels.update(w.image("test", i).tobytes())
    words = hashlib.sha256(json.dumps([w.references("test", i) for i in range(40)]).encode())
    assert pixels.hexdigest() == "12a4c7a0e2bd89e73e32557bb29e1f6e8920c8923dbbcff06c1b0666c93885ad"
    assert words.hexdigest() == "87f6737f21e3913fb5429b3dd304751e54ec685ab1e0bea0fc6f4e56901ad99f"
    # caches and exports made before keep their keys: the new fields are left out of the identity at defaults
    assert "shape_scale" not in w.config.identity() and "ref_drop" not in w.config.identity()
    assert World({"shape_scale": 0.75}).config.identity()["shape_scale"] == 0.75


def test_shifted_worlds_draw_smaller_shapes_and_more_detailed_references():
    """`shape_scale` shrinks the drawn objects and `ref_drop` makes references keep details; the defaults leave the
    standard world's scenes and references as they were (the same draws in the same order)."""
    base, small = World(SMALL), World(SMALL | {"shape_scale": 0.75, "noise": 0.0})
    plain = World(SMALL | {"noise": 0.0})
    lit = [(small.image("test", i).sum(-1) > 3 * 40).mean() / (plain.image("test", i).sum(-1) > 3 * 40).mean()
           for i in range(20)]
    assert 0.45 < np.mean(lit) < 0.7  # area ~ 0.75 ** 2
    assert [small.scene("test", i) for i in range(20)] == [base.scene("test", i) for i in range(20)]
    detailed = World(SMALL | {"ref_drop": {"position": 0.0}})
    assert detailed.config.ref_drop == {"size": 0.5, "colour": 0.35, "shape": 0.2, "position": 0.0}
    refs = [r for i in range(50) for r in detailed.references("test", i) if r not in GENERIC]
    assert all(" at " in r for r in refs)  # every mention keeps its position
    vague = [r for i in range(50) for r in base.references("test", i) if r not in GENERIC]
    assert np.mean([" at " in r for r in vague]) < 0.5
    assert World(SMALL | {"ref_drop": {}}).references("test", 7) == base.references("test", 7)
