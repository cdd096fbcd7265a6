"""What the report shows of the test split: the supervised and the fine-tuned captioner each decoded greedily and
with the run's own decoding (`eval.decoding`: four rows when that is `select` or `beam`, so RL's effect and the
decoding's are seen apart), and a gallery of test images, each with its references, the captions, each caption's
retrieval rank among the same 100 candidates as P@1, and (on the world) its words judged by the grammar."""
from __future__ import annotations

import sys
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


HEADLINE_KEYS = ("p_at_1", "wellformed", "faithful", "precision")  # the columns of the test table
REFERENCE_KEYS = ("bleu4", "cider", "clipscore", "refcompare")  # with eval.test_table_references


@dataclass
class TestRow:
    captioner: str  # "supervised" or "fine-tuned"
    decoding: str   # "greedy", "beam" or "select"
    metrics: dict


@dataclass
class TestComparison:
    before: dict  # the supervised captioner, greedy (as RL starts from it)
    after: dict   # the fine-tuned captioner with the run's decoding (as its final test evaluation)
    n_images: int
    items: list[GalleryItem]
    decoding: str = "greedy"  # the fine-tuned captioner's, in words
    rows: list[TestRow] = field(default_factory=list)  # each captioner with each decoding compared

    def headline(self) -> dict:
        """The test table for final_metrics.json: one row per captioner and decoding (its headline metrics), and
        the cut of P@1's error of each fine-tuned row relative to the supervised captioner's greedy error."""
        base = self.before.get("p_at_1")
        rows = [{"captioner": r.captioner, "decoding": r.decoding}
                | {k: r.metrics[k] for k in HEADLINE_KEYS + REFERENCE_KEYS if k in r.metrics} for r in self.rows]
        cut = {r.decoding: error_cut(base, r.metrics.get("p_at_1")) for r in self.rows if r.captioner == "fine-tuned"}
        return {"n_images": self.n_images, "rows": rows, "error_cut_vs_supervised_greedy": cut}


def reference_metrics(retriever, source, image_emb: torch.Tensor, captions: list[str]) -> dict:
    """BLEU-4 and CIDEr (pycocoevalcap, PTB tokenizer; absent without Java) and CLIPScore and RefCompare (the frozen
    retriever) of captions of the first len(captions) images of a labelled source, against its references."""
    from raycap.metrics.captions import clip_metrics, ngram_metrics

    refs = [source.references(i) for i in range(len(captions))]
    ngram = ngram_metrics(captions, refs, meteor=False)
    if "unavailable" in ngram:
        print(f"warning: eval.test_table_references: no BLEU-4 or CIDEr in the test table: "
              f"{next(iter(ngram['unavailable'].values()))}", file=sys.stderr)
    clip = clip_metrics(retriever, captions, image_emb[:len(captions)], refs)
    return {k: v for k, v in (ngram | clip).items() if k in REFERENCE_KEYS}


def error_cut(before: float | None, after: float | None) -> float | None:
    """The share of P@1's error (1 - P@1) removed going from `before` to `after` (None if undefined)."""
    if before is None or after is None or before >= 1:
        return None
    return 1 - (1 - after) / (1 - before)


def format_test_table(table: dict) -> str:
    """`TestComparison.headline()` as aligned text: one line per captioner and decoding, the error cut (relative
    to the supervised captioner's greedy error) on the fine-tuned lines."""
    keys = [k for k in HEADLINE_KEYS + REFERENCE_KEYS if all(k in r for r in table["rows"])]
    cut = table["error_cut_vs_supervised_greedy"]
    labels = [f"{r['captioner']}, {r['decoding']}" for r in table["rows"]]
    width = max(map(len, labels))
    lines = [f"test, the first {table['n_images']} images:",
             " " * width + "".join(f"{k:>12}" for k in keys) + "   P@1 error cut"]
    for label, r in zip(labels, table["rows"]):
        c = cut.get(r["decoding"]) if r["captioner"] == "fine-tuned" else None
        lines.append(f"{label:<{width}}" + "".join(f"{r[k]:>12.3f}" for k in keys)
                     + ("" if c is None else f"   {100 * c:.1f}%"))
    return "\n".join(lines)


def compared_decodings(decoding: str) -> list[str]:
    """The decodings the test table shows for each captioner: greedy, and the run's own when it is another."""
    return list(dict.fromkeys(["greedy", decoding]))


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
def compare_on_test(cfg: RunConfig, final_dir: Path, out: Path, n_gallery: int, log=print,
                    known: dict[tuple[str, str], list[str]] | None = None) -> TestComparison:
    """Both captioners on the run's test split (the first `eval.images`, as the run's final evaluation), each
    decoded greedily and with `eval.decoding` (`compared_decodings`), with `rl.sampling.max_new_tokens` as during the
    run; gallery images are written to `out/images/`. The gallery shows the supervised captioner's greedy captions and
    the fine-tuned captioner's with each decoding, under "CAPTIONER, DECODING". `known`: captions already decoded
    for a (captioner, decoding), e.g. the run's own test captions, used instead of decoding them again."""
    retriever = load_retriever(cfg.retriever)
    split = open_split(cfg, retriever, "test", log)
    models = {"supervised": load_captioner(cfg.captioner.path), "fine-tuned": load_captioner(final_dir)}
    n = min(cfg.eval.images, len(split.source))
    emb = split.embeddings[:n]
    decodings = compared_decodings(cfg.eval.decoding)
    pool = open_split(cfg, retriever, "train", log).embeddings if "select" in decodings else None
    selection, known = Selection.from_config(cfg), known or {}
    with_references = cfg.eval.test_table_references and split.source.labelled
    if cfg.eval.test_table_references and not with_references:
        print(f"warning: eval.test_table_references: the test split ({split.source.name}) has no references; the "
              "test table is scored without them", file=sys.stderr)
    rows, texts = [], {}
    for name, (model, tokenizer) in models.items():
        model.config.max_new_tokens = cfg.rl.sampling.max_new_tokens
        model.eval()
        reads = captioner_inputs(model, split.source.subset(range(n)), emb, log=log, retriever=retriever)
        for mode in decodings:
            captions = known.get((name, mode))
            if captions is None or len(captions) != n:
                captions = decode_images(model, tokenizer, retriever, reads, emb, mode, cfg.eval.num_beams,
                                         selection, pool, cfg.eval.batch_size)
            metrics = evaluate_images(model, tokenizer, retriever, split.source, emb, n, examples=0, captions=captions)
            metrics.pop("examples", None)
            if with_references:
                metrics |= reference_metrics(retriever, split.source, emb, captions)
            rows.append(TestRow(name, mode, metrics))
            texts[(name, mode)] = captions
    shown = {f"{c}, {d}": (c, d) for c, d in [("supervised", "greedy")] + [("fine-tuned", d) for d in decodings]}
    metrics_of = {(r.captioner, r.decoding): r.metrics for r in rows}
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
        for name, key in shown.items():
            some = texts[key][:g]
            ranks = target_ranks(retriever.encode_captions(some), emb, candidates)
            for i, (text, rank) in enumerate(zip(some, ranks.tolist())):
                view = CaptionView(text, rank)
                if scenes is not None:
                    from raycap.data.grammar import analyse, word_verdicts

                    view.words = word_verdicts(text, scenes[i])
                    view.faithful = analyse(text, scenes[i]).faithful
                items[i].captions[name] = view
    decoding = {"beam": f"beam {cfg.eval.num_beams}",
                "select": f"the best of {cfg.eval.select_samples} samples by the retriever"}.get(cfg.eval.decoding,
                                                                                               "greedy")
    return TestComparison(metrics_of["supervised", "greedy"], metrics_of["fine-tuned", cfg.eval.decoding], n, items,
                          decoding, rows)
