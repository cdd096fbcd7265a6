"""What the report shows of the test split: the supervised and the fine-tuned captioner's metrics, and a
gallery of test images, each with its references, both captions, each caption's retrieval rank among the same
100 candidates as P@1, and (on the world) its words judged by the grammar."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from raycap.config import RunConfig
from raycap.inputs import captioner_inputs, load_captioner, load_retriever, open_split
from raycap.metrics.retrieval import candidate_sets, target_ranks
from raycap.rl.selection import Selection
from raycap.supervised.captioner import decode_images, evaluate_images

P_AT_1_SEED = 0  # score_captions' candidate sets: the ranks shown are those P@1 counts


@dataclass
class CaptionView:
    text: str
    rank: int
    words: list[tuple[str, str]] | None = None  # (word, verdict) on the world: raycap.data.grammar.word_verdicts
    faithful: bool | None = None


@dataclass
class GalleryItem:
    image: str  # file name under the report dir
    image_id: str
    references: list[str] = field(default_factory=list)
    truth: str | None = None  # the world's full description
    captions: dict[str, CaptionView] = field(default_factory=dict)


@dataclass
class TestComparison:
    before: dict
    after: dict
    n_images: int
    items: list[GalleryItem]
    decoding: str = "greedy"  # the fine-tuned captioner's (the supervised one decodes greedily)


def display_image(image: Image.Image, small: int = 160, large: int = 320) -> Image.Image:
    """Tiny images (the world's 48 px) scaled up by a whole factor with nearest-neighbour, big ones shrunk."""
    side = max(image.size)
    if side < small:
        f = -(-small // side)
        return image.resize((image.width * f, image.height * f), Image.NEAREST)
    if side > large:
        image = image.copy()
        image.thumbnail((large, large))
    return image


@torch.no_grad()
def compare_on_test(cfg: RunConfig, final_dir: Path, out: Path, n_gallery: int, log=print) -> TestComparison:
    """Both captioners on the run's test split (the first `eval.images`, as the run's final evaluation): the
    supervised one greedy, the fine-tuned one with `eval.decoding` as that evaluation, both with `rl.max_new_tokens`
    as during the run; gallery images are written to `out/images/`."""
    retriever = load_retriever(cfg.retriever)
    split = open_split(cfg, retriever, "test", log)
    models = {"supervised": load_captioner(cfg.captioner.path), "fine-tuned": load_captioner(final_dir)}
    n = min(cfg.eval.images, len(split.source))
    emb = split.embeddings[:n]
    metrics, texts = {}, {}
    pool = open_split(cfg, retriever, "train", log).embeddings if cfg.eval.decoding == "select" else None
    for name, (model, tokenizer) in models.items():
        model.config.max_new_tokens = cfg.rl.max_new_tokens
        reads = captioner_inputs(model, split.source.subset(range(n)), emb, log=log, retriever=retriever)
        mode = cfg.eval.decoding if name == "fine-tuned" else "greedy"  # the supervised captioner as RL starts
        texts[name] = decode_images(model.eval(), tokenizer, retriever, reads, emb, mode, cfg.eval.num_beams,
                                    Selection.from_config(cfg), pool, cfg.eval.batch_size)
        metrics[name] = evaluate_images(model, tokenizer, retriever, split.source, emb, n, examples=0,
                                        captions=texts[name])
        metrics[name].pop("examples", None)
    g = min(n_gallery, n)
    scenes = split.source.scenes
    items = []
    if g:
        (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(g):
        name = f"images/test-{i}.png"
        display_image(split.source.image(i)).save(out / name)
        item = GalleryItem(name, split.source.ids[i])
        if split.source.labelled:
            item.references = list(split.source.references(i))
        if scenes is not None:
            item.truth = scenes[i].full_description
        items.append(item)
    if g:
        candidates = candidate_sets(n, 100, P_AT_1_SEED)[:g]
        for name in models:
            shown = texts[name][:g]
            ranks = target_ranks(retriever.encode_captions(shown), emb, candidates)
            for i, (text, rank) in enumerate(zip(shown, ranks.tolist())):
                view = CaptionView(text, rank)
                if scenes is not None:
                    from raycap.data.grammar import analyse, word_verdicts

                    view.words = word_verdicts(text, scenes[i])
                    view.faithful = analyse(text, scenes[i]).faithful
                items[i].captions[name] = view
    decoding = {"beam": f"beam {cfg.eval.num_beams}",
                "select": f"the best of {cfg.eval.select_samples} samples by the retriever"}.get(cfg.eval.decoding,
                                                                                               "greedy")
    return TestComparison(metrics["supervised"], metrics["fine-tuned"], n, items, decoding)
