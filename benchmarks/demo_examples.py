"""The quick start's before/after table from a finished run dir: the first test images' scenes, the supervised
captioner's greedy captions and the run's own test captions (RUN/final_captions.json, decoded with the run's
`eval.decoding`), each with its rank among the image's 100 P@1 candidates (the run's candidate sets) and its
false claims struck through (the world's judge; a measurement, as in the report).

    python benchmarks/demo_examples.py runs/demo-s0 [--images 5]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raycap.config import RunConfig
from raycap.data.grammar import analyse, word_verdicts
from raycap.inputs import captioner_inputs, load_captioner, load_retriever, open_split
from raycap.metrics.retrieval import candidate_sets, target_ranks
from raycap.report.gallery import P_AT_1_SEED
from raycap.supervised.captioner import decode_images


def marked(text: str, scene) -> str:
    """The caption with each false word (or every word of a caption outside the grammar) struck through."""
    words = [f"~~{w}~~" if verdict in ("false", "unparsed") else w for w, verdict in word_verdicts(text, scene)]
    return " ".join(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--images", type=int, default=5)
    args = p.parse_args()
    cfg = RunConfig.model_validate(json.loads((args.run / "config.json").read_text()))
    retriever = load_retriever(cfg.retriever).eval()
    split = open_split(cfg, retriever, "test", log=lambda *_: None)
    n, k = min(cfg.eval.images, len(split.source)), args.images
    emb = split.embeddings[:n]
    model, tokenizer = load_captioner(cfg.captioner.path)
    model.config.max_new_tokens = cfg.rl.sampling.max_new_tokens
    model.eval()
    reads = captioner_inputs(model, split.source.subset(range(k)), emb[:k], log=lambda *_: None, retriever=retriever)
    columns = {"supervised (greedy)": decode_images(model, tokenizer, retriever, reads, emb[:k]),
               f"`{args.run.name}` ({cfg.eval.decoding})":
               [c["caption"] for c in json.loads((args.run / "final_captions.json").read_text())[:k]]}
    candidates = candidate_sets(n, 100, P_AT_1_SEED)[:k]
    ranks = {name: target_ranks(retriever.encode_captions(texts), emb, candidates).tolist()
             for name, texts in columns.items()}
    print("| scene (the world's full description) | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for i in range(k):
        scene = split.source.scenes[i]
        cells = [f"{marked(texts[i], scene)} (rank {ranks[name][i]}, "
                 f"{'true' if analyse(texts[i], scene).faithful else 'false'})" for name, texts in columns.items()]
        print(f"| {scene.full_description} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
