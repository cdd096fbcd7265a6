"""The `select` decoding (raycap/rl/selection.py): its score on a hand-computed example, the caption it keeps is
the best of the image's samples under that score, it reads captions and embeddings only, and on the shipped world
its absolute-match and self-check terms make the kept captions more faithful than the pool score alone."""
import math

import pytest
import torch
import torch.nn.functional as F

from raycap.config import WORLD_DIR, load_config
from raycap.data.grammar import caption_checks
from raycap.models.loading import load_world_dir
from raycap.models.tokenizers import decode
from raycap.rl.selection import Selection, select_captions, selection_scores


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_selection_score_against_a_hand_computation():
    texts = unit([1, 0], [1, 1])
    images = unit([1, 0], [1, 0])  # both captions are of the same image
    pool = unit([0, 1], [-1, 0])
    scale, c = 10.0, 1 / math.sqrt(2)
    never = lambda texts: pytest.fail("no self-check asked for")  # noqa: E731
    got = selection_scores(["a", "b"], texts, images, pool, scale, Selection(cosine_coef=0.5, check_coef=0), never)
    own = torch.tensor([10.0, 10 * c])
    lse = torch.tensor([math.log(math.exp(10) + math.exp(0) + math.exp(-10)),
                        math.log(math.exp(10 * c) + math.exp(10 * c) + math.exp(-10 * c))])
    torch.testing.assert_close(got, own - lse + 0.5 * own)


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    pw = load_world_dir(WORLD_DIR)
    n = 200
    emb = pw.retriever.encode_pixels(pw.world.images("val", range(n)))
    pool = pw.retriever.encode_pixels(pw.world.images("train", range(5000)))
    return pw, emb, pool, [pw.world.scene("val", i) for i in range(n)]


def test_the_kept_caption_is_the_best_of_its_samples_and_only_embeddings_are_read(shipped):
    pw, emb, pool, _ = shipped
    cfg = load_config("world-demo")
    sel = Selection(samples=4, cosine_coef=0.5, check_coef=3.0, classes=cfg.rl.self_check.substitution_classes,
                    seed=7, chunk=8)
    emb = emb[:8].clone()  # the images' embeddings and nothing of their scenes
    kept = select_captions(pw.captioner, pw.retriever.tokenizer, emb, emb, pw.retriever, pool, sel)
    gen = torch.Generator().manual_seed(7 * 1_000_003)
    caps = pw.captioner.generate(emb, mode="sample", num_samples=4, generator=gen)
    texts = decode(pw.retriever.tokenizer, caps.tokens, caps.lengths, pw.captioner.stop_ids)
    scores = selection_scores(texts, pw.retriever.encode_captions(texts), emb.repeat_interleave(4, 0), pool,
                              float(pw.retriever.logit_scale), sel, pw.retriever.encode_captions).view(8, 4)
    assert kept == [texts[4 * i + int(j)] for i, j in enumerate(scores.argmax(1))]
    assert len(set(texts)) > 8  # the samples differ, so the choice is a choice


def test_the_match_and_check_terms_keep_truer_captions_on_the_shipped_world(shipped):
    """200 validation images, the supervised captioner, 8 samples each: the demo's selection (pool + its cosine and
    self-check terms) keeps more faithful captions than the pool score alone, and more discriminative ones than
    greedy."""
    pw, emb, pool, scenes = shipped
    demo_cfg = load_config("world-demo")
    classes = demo_cfg.rl.self_check.substitution_classes

    def kept(cos, check):
        sel = Selection(samples=8, cosine_coef=cos, check_coef=check, classes=classes, seed=0)
        return select_captions(pw.captioner, pw.retriever.tokenizer, emb, emb, pw.retriever, pool, sel)

    pool_only = caption_checks(kept(0, 0), scenes)
    demo = caption_checks(kept(demo_cfg.eval.select_cosine, demo_cfg.eval.select_check), scenes)
    assert demo["faithful"] > pool_only["faithful"] + 0.05, (pool_only["faithful"], demo["faithful"])
    assert demo["wellformed"] >= 0.95
