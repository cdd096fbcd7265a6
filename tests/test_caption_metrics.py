"""raycap's n-gram metrics are pycocoevalcap's COCOEvalCap numbers, PTB tokenizer included, on captions with
real punctuation (quotes, apostrophes, hyphens, commas, full stops)."""
import json
import random
import shutil

import pytest

from raycap.metrics.captions import ngram_metrics

WORDS = ["a", "man", "woman's", "dog", "riding", "on", "the", "beach", "red", "two-story", "house", "near",
         "\"stop\"", "sign", "it's", "people", "sitting", "at", "table", "with", "pizza", "cat", "isn't", "black",
         "and", "white", "photo", "of", "street", "well-lit", "kitchen", "(blurry)", "children's", "toys", "o'clock"]


def sentence(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
    if rng.random() < 0.5:
        words[rng.randrange(len(words))] += ","
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", "", " .", "!", "..."])


@pytest.mark.skipif(not shutil.which("java"), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_ngram_metrics_equal_cocoevalcap(tmp_path, monkeypatch):
    import pycocoevalcap.eval as evalcap
    from pycocotools.coco import COCO

    rng = random.Random(0)
    captions = [sentence(rng) for _ in range(60)]
    references = [[sentence(rng) for _ in range(5)] for _ in range(60)]
    ann = {"images": [{"id": i} for i in range(60)], "type": "captions", "info": {}, "licenses": [],
           "annotations": [{"image_id": i, "id": 5 * i + k, "caption": r}
                           for i, refs in enumerate(references) for k, r in enumerate(refs)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in enumerate(captions)]))

    class NoSpice:  # SPICE needs CoreNLP jars that cannot be downloaded here; every other scorer is theirs
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(evalcap, "Spice", NoSpice)
    coco = COCO(str(tmp_path / "ann.json"))
    ev = evalcap.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    ev.evaluate()
    ours = ngram_metrics(captions, references)
    theirs = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4", "meteor": "METEOR",
              "rouge_l": "ROUGE_L", "cider": "CIDEr"}
    for key, name in theirs.items():
        assert ours[key] == pytest.approx(ev.eval[name], abs=1e-9), (key, ours[key], ev.eval[name])


def test_without_java_the_metrics_are_unavailable_not_zero(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = ngram_metrics(["a dog."], [["a dog", "a cat"]])
    assert set(out) == {"unavailable"} and "Java" in out["unavailable"]["bleu4"] and "meteor" in out["unavailable"]


def test_diversity_on_a_hand_computed_example():
    from raycap.metrics.captions import vocabulary_metrics

    caps = ["a red dog", "a red dog", "a blue cat", "a dog"]
    out = vocabulary_metrics(caps)
    # words: 11, unique 5 (a red dog blue cat); bigrams: 2+2+2+1 = 7, unique: a-red, red-dog, a-blue, blue-cat, a-dog
    assert out["vocab_size"] == 5 and out["distinct_1"] == pytest.approx(5 / 11)
    assert out["distinct_2"] == pytest.approx(5 / 7) and out["unique_caption_ratio"] == 0.75
    assert out["top_caption"] == "a red dog" and out["top_caption_share"] == 0.5
    assert "50% of the images get the same caption ('a red dog')" in out["collapse_warning"]
    assert "collapse_warning" not in vocabulary_metrics(["a b", "c d", "e f", "g h", "i j", "k l"])
