"""Evaluation metrics beyond the n-gram ones, each on a hand-computed example: RefCLIPScore, P@1 with hard
distractors, CHAIR (synonyms, plurals, ground truth from instances and references), and `raycap.evaluate
--text-only --instances` on a dataset whose images are not on disk."""
import json
import math
import shutil

import pytest
import torch

from raycap.errors import UserError
from raycap.metrics.captions import clip_metrics
from raycap.metrics.chair import COCO_CATEGORIES, chair, chair_truth, mentioned_objects, read_instances
from raycap.metrics.retrieval import candidate_sets, hard_candidate_sets


class FixedRetriever:
    """encode_captions from a fixed table of unit vectors."""

    def __init__(self, table):
        self.table = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)
                      for k, v in table.items()}

    def encode_captions(self, texts):
        return torch.stack([self.table[t] for t in texts])


def test_clipscore_refclipscore_and_refcompare_by_hand():
    r = FixedRetriever({"c0": [1, 0], "c1": [0, 1], "r0": [0.6, 0.8], "r1": [-1, 0], "r2": [1, 0]})
    images = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])
    out = clip_metrics(r, ["c0", "c1"], images, [["r0", "r1"], ["r2"]])
    # image 0: cos(c0, img) = .8 -> CLIP-S 2.0; refs cos .6 and -1 -> max .6; HM = 2*2*.6/2.6
    # image 1: cos(c1, img) = 0 -> CLIP-S 0; ref cos(c1, r2) = 0 -> HM 0 (both 0)
    assert out["clipscore"] == pytest.approx((2.0 + 0.0) / 2)
    assert out["refclipscore"] == pytest.approx((2 * 2.0 * 0.6 / 2.6 + 0.0) / 2)
    # RefCompare: image 0's refs score .96 and -.8 against it, the caption .8 -> 1/2; image 1: ref -1 < 0 -> 1
    assert out["refcompare"] == pytest.approx((0.5 + 1.0) / 2)


def test_hard_candidates_put_the_nearest_images_in_front_of_the_same_random_ones():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(150, 8, generator=g), dim=1)
    emb[1] = torch.nn.functional.normalize(emb[0] + 1e-3 * torch.randn(8, generator=g), dim=0)  # near-duplicate
    base = candidate_sets(150, 100, 0)
    hard = hard_candidate_sets(emb, 5, 100, 0, max_cos=0.8)
    assert hard.shape == (150, 100) and torch.equal(hard[:, 0], torch.arange(150))
    for i in (0, 7, 149):
        sims = emb @ emb[i]
        sims[i] = -2
        sims[sims > 0.8] = -2  # the near-duplicate is skipped
        assert set(hard[i, 1:6].tolist()) == set(sims.topk(5).indices.tolist())
        assert len(set(hard[i].tolist())) == 100
        rest = [j for j in base[i, 1:].tolist() if j not in set(hard[i, 1:6].tolist())]
        assert hard[i, 6:].tolist() == rest[:94]
    assert 1 not in hard[0, 1:6].tolist()
    assert torch.equal(hard_candidate_sets(emb, 0, 100, 0), base)


def test_chair_synonyms_plurals_and_longest_phrases():
    assert mentioned_objects("Two men riding bikes past a hot dog stand.") == {"person", "bicycle", "hot dog"}
    assert mentioned_objects("a teddy bear and a bear") == {"teddy bear", "bear"}
    assert mentioned_objects("an orange cat on a sofa") == {"cat", "couch"}  # singular orange is the colour
    assert mentioned_objects("a bowl of oranges") == {"bowl", "orange"}
    assert mentioned_objects("puppies, ponies and buses") == {"dog", "horse", "bus"}
    assert mentioned_objects("a baseball player holds a bat") == {"person", "baseball bat"}
    assert len(COCO_CATEGORIES) == 80


def test_chair_by_hand():
    captions = ["a man with a dog on a couch", "a cat on a bed", "a pizza"]
    truth = [{"person", "dog"}, {"cat", "bed"}, {"dining table"}]
    # caption 0: person, dog, couch -> couch hallucinated; 1: none; 2: pizza hallucinated
    out = chair(captions, truth)
    assert out["chair_mentions"] == 6 and out["chair_hallucinated"] == 2
    assert out["chair_i"] == pytest.approx(2 / 6) and out["chair_s"] == pytest.approx(2 / 3)


def instances_file(path, images, annotations):
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(COCO_CATEGORIES)]
    ident = {c["name"]: c["id"] for c in categories}
    path.write_text(json.dumps({"images": [{"id": i} for i in images], "categories": categories,
                                "annotations": [{"image_id": i, "category_id": ident[c]} for i, c in annotations]}))
    return path


def test_instances_file_and_truth_errors_are_one_line(tmp_path):
    path = instances_file(tmp_path / "instances.json", [1, 2], [(1, "dog"), (1, "person")])
    assert read_instances(path) == {"1": {"dog", "person"}, "2": set()}
    truth = chair_truth(["1", "2"], read_instances(path), [["a man and his dog"], ["a pizza on a table"]], "x")
    assert truth == [{"dog", "person"}, {"pizza", "dining table"}]  # the references' objects join the truth
    with pytest.raises(UserError, match="image id '3' is not in the instances file"):
        chair_truth(["3"], read_instances(path), None, "x")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "unicorn"}]}))
    with pytest.raises(UserError, match="categories\\[0\\] is not one of the 80 COCO categories"):
        read_instances(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="missing the 'annotations' list"):
        read_instances(bad)


def test_evaluate_text_only_with_chair_reads_no_image(tmp_path):
    """A Karpathy file whose images were never downloaded, a results file and an instances file: CHAIR and the
    n-gram metrics, the image metrics listed as unavailable."""
    from raycap.evaluate import main as evaluate_main

    refs = ["a man riding a horse", "a dog on a bed", "a plate of food on a table"]
    items = [{"filepath": "val2014", "filename": f"{i}.jpg", "split": "test", "cocoid": 10 + i,
              "sentences": [{"raw": r}]} for i, r in enumerate(refs)]
    dataset = tmp_path / "dataset_coco.json"
    dataset.write_text(json.dumps({"images": items}))
    results = tmp_path / "results.json"
    captions = ["a man riding a horse", "a cat on a bed", "a pizza on a table"]
    results.write_text(json.dumps([{"image_id": 10 + i, "caption": c} for i, c in enumerate(captions)]))
    instances = instances_file(tmp_path / "instances.json", [10, 11, 12],
                               [(10, "person"), (10, "horse"), (11, "dog"), (11, "bed"), (12, "dining table")])
    out = evaluate_main(["--captions", str(results), "--dataset", f"karpathy:{dataset}:test", "--text-only",
                         "--instances", str(instances), "--json", str(tmp_path / "eval.json")])
    # mentions: {person, horse} | {cat, bed} (cat hallucinated) | {pizza, dining table} (pizza hallucinated)
    assert out["chair_i"] == pytest.approx(2 / 6) and out["chair_s"] == pytest.approx(2 / 3)
    assert out["n_images"] == 3 and "p_at_1" not in out
    for metric in ("p_at_1", "clipscore", "refclipscore", "refcompare"):
        assert "--text-only" in out["unavailable"][metric]
    if shutil.which("java"):
        assert 0 < out["bleu1"] <= 1 and not math.isnan(out["cider"])
    assert json.loads((tmp_path / "eval.json").read_text())["chair_s"] == out["chair_s"]


def test_text_only_needs_captions(capsys):
    from raycap.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as e:
        evaluate_main(["--captioner", ".", "--text-only"])
    assert e.value.code == 2 and "--text-only scores given captions" in capsys.readouterr().err
