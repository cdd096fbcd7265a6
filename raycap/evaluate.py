"""Evaluate a captioner: `python -m raycap.evaluate --captioner DIR --dataset world:test --json OUT.json`.

Prints and writes: p_at_1 (retrieval among 100 by the frozen retriever: target + 99 random images, fixed seed),
bleu1-4 / meteor / rouge_l / cider against the vague references (exactly pycocoevalcap's COCOEvalCap, PTB
tokenizer included), cider_full against the full descriptions,
clipscore, refcompare, vocab_size, unique_caption_ratio, and the world's caption checks (wellformed, faithful,
precision, recall, multi_object, repetition). SPICE is reported as unavailable with its reason.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raycap.config import ASSETS_DIR
from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_file
from raycap.progress import quiet_library_progress

MIN_IMAGES = 100  # P@1 candidates per target (raycap.metrics.retrieval.candidate_sets)


def evaluate_world(captioner_dir: Path, world_dir: Path, split: str, n: int | None, mode: str,
                   num_beams: int, seed: int = 0) -> dict:
    from raycap.data.cache import world_image_embeddings
    from raycap.metrics.captions import SPICE_UNAVAILABLE, clip_metrics, ngram_metrics
    from raycap.models.loading import load_world_dir
    from raycap.supervised.captioner import score_captions, world_captions

    pw = load_world_dir(world_dir, captioner=captioner_dir)
    world, retriever, captioner = pw.world, pw.retriever, pw.captioner.eval()
    n = min(n or world.config.split_size(split), world.config.split_size(split))
    image_emb = world_image_embeddings(retriever, world, split, n)
    captions, _, scenes = world_captions(captioner, retriever, world, split, n, mode, num_beams, image_emb)
    refs = [world.references(split, i) for i in range(n)]
    result = score_captions(captions, retriever, image_emb, scenes, seed)
    examples = result.pop("examples")
    ngram = ngram_metrics(captions, refs)
    unavailable = ngram.pop("unavailable", {}) | {"spice": SPICE_UNAVAILABLE}
    result |= ngram
    full = ngram_metrics(captions, [[s.full_description] for s in scenes], meteor=False)
    if "cider" in full:
        result["cider_full"] = full["cider"]
    else:
        unavailable["cider_full"] = full["unavailable"]["cider"]
    result |= clip_metrics(retriever, captions, image_emb, refs)
    result["spice"] = None
    result["unavailable"] = unavailable
    result["n_images"], result["decoding"] = n, mode if mode != "beam" else f"beam{num_beams}"
    result["examples"] = examples
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raycap.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captioner", type=Path, required=True, help="captioner dir (e.g. RUN/final)")
    p.add_argument("--dataset", default="world:test", help="world:SPLIT (test, val)")
    p.add_argument("--world-dir", type=Path, default=ASSETS_DIR / "world",
                   help="pretrained world dir with world.json and retriever/ (default: the shipped one)")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--images", type=int, default=None, help="evaluate the first N images (default: all)")
    p.add_argument("--json", type=Path, help="write the metrics here")
    return p


def check_arguments(args, split: str) -> None:
    """One-line UserErrors for arguments that would fail only after the models load or the evaluation ran."""
    if args.images is not None and args.images < MIN_IMAGES:
        raise UserError(f"--images {args.images}: P@1 ranks each target among {MIN_IMAGES} candidates (target + "
                        f"{MIN_IMAGES - 1} other images), so at least {MIN_IMAGES} images are needed")
    if args.num_beams < 1:
        raise UserError(f"--num-beams {args.num_beams}: must be >= 1")
    if not args.captioner.is_dir():
        raise UserError(f"--captioner {args.captioner}: no such directory")
    world_json = args.world_dir / "world.json"
    if world_json.is_file():  # cheap: the split's size, before the models load
        from raycap.data.world import WorldConfig

        try:
            data = json.loads(world_json.read_text())
        except ValueError as e:
            raise UserError(f"{world_json}: not valid JSON ({e})") from None
        size = WorldConfig.parse(data, str(world_json)).split_size(split)
        if size < MIN_IMAGES:
            raise UserError(f"{world_json}: the {split} split has {size} images; P@1 needs at least {MIN_IMAGES}")
    if args.json is not None:
        check_output_file(args.json, "--json")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        kind, _, split = args.dataset.partition(":")
        if kind != "world" or split not in ("test", "val", "train"):
            raise UserError(f"--dataset {args.dataset!r}: expected world:test or world:val")
        check_arguments(args, split)  # before any model loads, and the --json path before the evaluation runs
        quiet_library_progress()
        result = evaluate_world(args.captioner, args.world_dir, split, args.images, args.decoding, args.num_beams)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    if "collapse_warning" in result:
        import sys

        print(f"warning: {result['collapse_warning']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
