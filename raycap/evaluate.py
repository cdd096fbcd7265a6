"""Evaluate a captioner, or captions from any system, on a dataset:

    python -m raycap.evaluate --captioner DIR --dataset world:test --json OUT.json
    python -m raycap.evaluate --captions RESULTS.json --dataset karpathy:dataset_coco.json:test \\
        --retriever-name ViT-B-32 --pretrained openai

`--dataset`: world:SPLIT | karpathy:DATASET.json[:SPLIT] | coco:ANNOTATIONS.json[:IMAGE_ROOT] |
nocaps:ANNOTATIONS.json[:IMAGE_ROOT] | cc:FILE.tsv[:IMAGE_ROOT] | folder:DIR[:CAPTIONS.jsonl].
`--captions`: COCO results format, `[{"image_id": ..., "caption": ...}]`, one per image of the dataset (image_id
as the dataset's ids: COCO ids, Karpathy cocoid/imgid, file paths for folders and CC, `SPLIT-INDEX` for the
world); a caption over 2,000 characters is refused, and image_ids the dataset lacks are ignored with a warning.

Prints and writes: p_at_1 (retrieval among 100 by the frozen retriever: target + 99 random images, fixed seed)
and p_at_1_hardK (K of the 99 replaced by the target's nearest images, `--hard-distractors`); with references
bleu1-4 / meteor / rouge_l / cider exactly as pycocoevalcap's COCOEvalCap computes them (PTB tokenizer included),
refclipscore and refcompare; clipscore; with `--instances` (COCO instance annotations) chair_i / chair_s; diversity (vocab_size, distinct_1/2, unique_caption_ratio,
top_caption and its share, a collapse warning); on the world also cider_full against the full descriptions and
the caption checks (wellformed, faithful, precision, recall, multi_object, repetition). Metrics that cannot be
computed are listed under `unavailable` with the reason (SPICE: CoreNLP cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from raycap.config import WORLD_DIR
from raycap.metrics.results import coco_results
from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_file
from raycap.progress import quiet_library_progress
from raycap.commands import prog

MIN_IMAGES = 100  # P@1 candidates per target (raycap.metrics.retrieval.candidate_sets)
MAX_CAPTION_CHARS = 2000  # a --captions caption longer than this is refused (COCO's references: under 300)


def open_dataset(spec: str, world_dir: Path, on_bad_image: str, image_root: Path | None = None):
    """The image source a `--dataset` string names (world splits from `world_dir`; image paths under
    `image_root` when given) and the items left out."""
    from raycap.data.datasets import parse_dataset_spec
    from raycap.inputs import open_images

    kw = parse_dataset_spec(spec, image_root)
    if kw["kind"] == "world":
        kw["path"] = world_dir
    return open_images(**kw, where=f"--dataset {spec}", on_bad_image=on_bad_image)


@contextmanager
def bad_images_named_by_flag():
    """An unreadable image says how to leave it out with this command's flag, not the run config's key."""
    from raycap.data.sources import BadImage

    try:
        yield
    except BadImage as e:
        raise e.naming("pass --on-bad-image skip") from None


def read_results(path: Path) -> dict[str, str]:
    """{image id: caption} of a COCO results file; one line naming the file and the entry when malformed."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--captions {path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"--captions {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"--captions {path}: expected a list of {{\"image_id\", \"caption\"}} entries")
    out = {}
    for k, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise UserError(f"--captions {path}: entry {k} needs \"image_id\" and a string \"caption\"")
        key = str(item["image_id"])
        if key in out:
            raise UserError(f"--captions {path}: image_id {item['image_id']!r} appears twice (entry {k})")
        if len(item["caption"]) > MAX_CAPTION_CHARS:
            raise UserError(f"--captions {path}: the caption of image_id {item['image_id']!r} has "
                            f"{len(item['caption']):,} characters, over the limit of {MAX_CAPTION_CHARS:,} "
                            f"(entry {k})")
        out[key] = item["caption"]
    return out


def evaluate_dataset(args) -> dict:
    from raycap.config import RuntimeConfig
    from raycap.data.cache import image_embeddings
    from raycap.inputs import local_ray_for, retriever_from_arguments
    from raycap.metrics.captions import SPICE_UNAVAILABLE, clip_metrics, ngram_metrics
    from raycap.supervised.captioner import score_captions

    source, skipped = open_dataset(args.dataset, args.world_dir, "ignore" if args.text_only else args.on_bad_image,
                                   args.image_root)
    known = {str(i) for i in source.ids} | {str(s["id"]) for s in skipped}  # the dataset's ids, every one
    if args.text_only:
        return evaluate_text(args, source, known) | {"skipped_images": len(skipped)}
    n = min(args.images or len(source), len(source))
    if n < MIN_IMAGES:
        raise UserError(f"--dataset {args.dataset}: {n} images; P@1 ranks each among {MIN_IMAGES}, so at least "
                        f"{MIN_IMAGES} are needed")
    source = source.subset(range(n)) if n < len(source) else source
    from raycap.models.devices import resolve_device

    device = resolve_device(args.device)
    retriever, retriever_label = retriever_from_arguments(args, args.world_dir / "retriever")
    retriever.to(device)
    with local_ray_for([source], RuntimeConfig()):  # image files: Ray Data embeds them, on a local loopback Ray
        cached = image_embeddings(retriever, source, on_bad_image=args.on_bad_image, log=print)
    skipped = skipped + cached.skipped
    known |= {str(s["id"]) for s in cached.skipped}
    if len(cached.kept) < len(source):
        source = source.subset(cached.kept.tolist())
    image_emb = cached.embeddings
    if args.captions:
        captions = given_captions(args, source, known)
        decoding = "given"
    else:
        from raycap.inputs import check_compatible, load_captioner
        from raycap.supervised.captioner import decode_images

        captioner, tokenizer = load_captioner(args.captioner)
        check_compatible(captioner, retriever, f"--captioner {args.captioner}", retriever_label)
        captioner.to(device)
        from raycap.inputs import captioner_inputs

        inputs = captioner_inputs(captioner, source, image_emb, retriever=retriever)
        selection = pool = None
        decoding = args.decoding if args.decoding != "beam" else f"beam{args.num_beams}"
        if args.decoding == "select":
            from raycap.config import load_config
            from raycap.rl.selection import Selection

            selection = Selection.from_config(load_config(args.select_config))
            pool_source, _ = open_dataset(args.pool, args.world_dir, "skip")
            with local_ray_for([pool_source], RuntimeConfig()):
                pool = image_embeddings(retriever, pool_source, on_bad_image="skip", log=print).embeddings
            decoding = f"select{selection.samples}"
        captions = decode_images(captioner.eval(), tokenizer, retriever, inputs, image_emb, args.decoding,
                                 args.num_beams, selection, pool, args.batch_size)
    scenes = source.scenes
    refs = [source.references(i) for i in range(len(source))] if source.labelled else None
    text_emb = retriever.encode_captions(captions)  # once, for P@1, the CLIP metrics and the hard P@1
    result = score_captions(captions, retriever, image_emb, scenes, args.seed, references=refs, text_emb=text_emb)
    examples = result.pop("examples")
    unavailable = {"spice": SPICE_UNAVAILABLE}
    if refs is not None:
        ngram = ngram_metrics(captions, refs, ids=source.ids)
        unavailable |= ngram.pop("unavailable", {})
        result |= ngram
    else:
        unavailable |= {m: "the dataset has no reference captions" for m in
                        ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "refcompare", "refclipscore")}
    if scenes is not None:
        full = ngram_metrics(captions, [[s.full_description] for s in scenes], meteor=False)
        if "cider" in full:
            result["cider_full"] = full["cider"]
        else:
            unavailable["cider_full"] = full["unavailable"]["cider"]
    else:
        unavailable["caption checks"] = "they need the world's scenes (world:SPLIT or the exported world)"
    result |= clip_metrics(retriever, captions, image_emb, refs, text_emb=text_emb)
    result |= hard_p_at_1(text_emb, image_emb, args.hard_distractors, args.near_duplicate, args.seed)
    if args.instances is not None:
        from raycap.metrics.chair import chair, chair_truth, read_instances

        truth = chair_truth(source.ids, read_instances(args.instances), refs, f"--dataset {args.dataset}")
        result |= chair(captions, truth)
    else:
        unavailable["chair"] = ("CHAIR needs COCO instance annotations (--instances instances_val2014.json)" +
                                ("; on the world the grammar's checks (faithful, precision) judge every claim"
                                 if scenes is not None else ""))
    result["spice"] = None
    result |= {"unavailable": unavailable, "n_images": len(source), "decoding": decoding, "dataset": args.dataset,
               "skipped_images": len(skipped), "examples": examples, "captions": coco_results(source.ids, captions)}
    return result


IMAGE_METRICS = ("p_at_1", "p_at_1_hard", "clipscore", "refclipscore", "refcompare")


def given_captions(args, source, known: set[str] | None = None) -> list[str]:
    """The `--captions` file's caption of every image of the source, in its order (one line if any is missing).
    `known`: every image id of the dataset (the source may be its first --images, or lack images left out); the
    file's image_ids that the dataset lacks are ignored with a one-line warning saying how many."""
    results = read_results(args.captions)
    missing = [i for i in source.ids if i not in results]
    if missing:
        raise UserError(f"--captions {args.captions}: no caption for image_id {missing[0]!r} of {args.dataset}"
                        f" ({len(missing)} of {len(source)} images have none)")
    known = set(source.ids) if known is None else known
    extra = [i for i in results if i not in known]
    if extra:
        print(f"warning: --captions {args.captions}: {len(extra)} of its {len(results)} image_ids are not in "
              f"{args.dataset} (e.g. {extra[0]!r}) and are ignored", file=sys.stderr)
    return [results[i] for i in source.ids]


def evaluate_text(args, source, known: set[str] | None = None) -> dict:
    """`--text-only`: captions against references with no image read (nothing downloaded but the annotations):
    the n-gram metrics, diversity, CHAIR with `--instances`, the world's checks on the world; the image metrics
    are listed as unavailable."""
    from raycap.data.grammar import caption_checks
    from raycap.metrics.captions import SPICE_UNAVAILABLE, ngram_metrics, vocabulary_metrics

    if args.images:
        source = source.subset(range(min(args.images, len(source))))
    captions = given_captions(args, source, known)
    reason = "--text-only: no image is read"
    unavailable = {m: reason for m in IMAGE_METRICS} | {"spice": SPICE_UNAVAILABLE}
    result = {}
    refs = [source.references(i) for i in range(len(source))] if source.labelled else None
    if refs is None:
        raise UserError(f"--dataset {args.dataset}: --text-only scores captions against references, and this "
                        "dataset has none")
    ngram = ngram_metrics(captions, refs, ids=source.ids)
    unavailable |= ngram.pop("unavailable", {})
    result |= ngram
    scenes = source.scenes
    if scenes is not None:
        result |= caption_checks(captions, scenes)
    result |= vocabulary_metrics(captions)
    if args.instances is not None:
        from raycap.metrics.chair import chair, chair_truth, read_instances

        result |= chair(captions, chair_truth(source.ids, read_instances(args.instances), refs,
                                              f"--dataset {args.dataset}"))
    else:
        unavailable["chair"] = "CHAIR needs COCO instance annotations (--instances instances_val2014.json)"
    examples = [{"caption": c, "references": r} for c, r in zip(captions[:3], refs[:3])]
    return result | {"spice": None, "unavailable": unavailable, "n_images": len(source), "decoding": "given",
                     "dataset": args.dataset, "examples": examples, "captions": coco_results(source.ids, captions)}


def hard_p_at_1(text_emb, image_emb, ks, max_cos: float, seed: int) -> dict:
    """`p_at_1_hardK`: P@1 among 100 where K of the 99 random distractors give way to the target's K nearest
    images by image cosine (near-duplicates above `max_cos` skipped)."""
    from raycap.metrics.retrieval import hard_candidate_sets, p_at_1

    if not ks:
        return {}
    return {f"p_at_1_hard{k}": p_at_1(text_emb, image_emb, hard_candidate_sets(image_emb, k, MIN_IMAGES, seed, max_cos))
            for k in ks}


def build_parser() -> argparse.ArgumentParser:
    from raycap.inputs import add_retriever_arguments

    p = argparse.ArgumentParser(prog=prog("raycap.evaluate"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--captioner", type=Path, help="captioner dir (e.g. RUN/final)")
    what.add_argument("--captions", type=Path, help="COCO results JSON: [{\"image_id\", \"caption\"}]")
    p.add_argument("--dataset", default="world:test", help="world:SPLIT, karpathy:FILE[:SPLIT], coco:FILE[:IMAGES], "
                   "nocaps:FILE[:IMAGES], cc:TSV[:IMAGES], folder:DIR[:CAPTIONS.jsonl] (default: world:test)")
    p.add_argument("--image-root", type=Path, help="where the dataset's image paths start (default: beside its "
                   "annotation file; for coco/nocaps/cc, instead of the spec's IMAGE_ROOT)")
    p.add_argument("--world-dir", type=Path, default=WORLD_DIR,
                   help="pretrained world dir with world.json and retriever/ (default: the shipped one)")
    add_retriever_arguments(p, Path("WORLD_DIR/retriever"))
    p.add_argument("--decoding", choices=["greedy", "beam", "select"], default="greedy",
                   help="select: the best of eval.select_samples sampled captions under the retriever "
                        "(raycap/rl/selection.py), with the settings of --select-config")
    p.add_argument("--select-config", default="world-demo",
                   help="select: the run config whose eval.select_* and rl.self_check.substitution_classes apply")
    p.add_argument("--pool", default="world:train",
                   help="select: the images a caption must single its image out from (a --dataset spec; never "
                        "the evaluated images, among which P@1 draws its distractors)")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512, help="sequences decoded at once (images x beams, or x "
                   "samples for select): bounds memory, not the captions")
    p.add_argument("--images", type=int, default=None, help="evaluate the first N images (default: all)")
    p.add_argument("--device", default="auto", help="where the captioner decodes and the retriever encodes: auto "
                   "(cuda when visible, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error")
    p.add_argument("--seed", type=int, default=0, help="seed of the P@1 candidate sets")
    p.add_argument("--hard-distractors", type=int, nargs="*", default=[5], metavar="K",
                   help="also P@1 with K of the 99 distractors the target's nearest images (default: 5; none: off)")
    p.add_argument("--near-duplicate", type=float, default=0.8,
                   help="hard distractors skip images with image cosine above this (default: 0.8)")
    p.add_argument("--text-only", action="store_true", help="with --captions: read no image; the n-gram metrics "
                   "against the references (and CHAIR), the image metrics listed as unavailable")
    p.add_argument("--instances", type=Path, help="COCO instance annotations (instances_val2014.json): CHAIR-i/s")
    p.add_argument("--json", type=Path, help="write the metrics here")
    p.add_argument("--save-captions", type=Path, metavar="RESULTS.json", help="write the evaluated captions in COCO "
                   "results format ([{\"image_id\", \"caption\"}], the dataset's own ids), what the COCO and "
                   "nocaps evaluation servers and --captions read")
    return p


def check_arguments(args) -> None:
    """One-line UserErrors for arguments that would fail only after the models load or the evaluation ran."""
    from raycap.data.datasets import parse_dataset_spec
    from raycap.inputs import check_retriever_arguments

    if args.text_only and args.captions is None:
        raise UserError("--text-only scores given captions: it needs --captions RESULTS.json")
    if args.images is not None and args.images < MIN_IMAGES and not args.text_only:
        raise UserError(f"--images {args.images}: P@1 ranks each target among {MIN_IMAGES} candidates (target + "
                        f"{MIN_IMAGES - 1} other images), so at least {MIN_IMAGES} images are needed")
    bad = [k for k in args.hard_distractors if not 0 < k < MIN_IMAGES]
    if bad:
        raise UserError(f"--hard-distractors {bad[0]}: must be between 1 and {MIN_IMAGES - 1}")
    if not -1 <= args.near_duplicate <= 1:
        raise UserError(f"--near-duplicate {args.near_duplicate}: a cosine, between -1 and 1")
    if args.instances is not None and not args.instances.is_file():
        raise UserError(f"--instances {args.instances}: no such file")
    if args.num_beams < 1:
        raise UserError(f"--num-beams {args.num_beams}: must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.decoding == "select":
        from raycap.config import load_config

        load_config(args.select_config)  # a bad config: one line, before the models load
        if args.pool == args.dataset:
            raise UserError(f"--pool {args.pool}: the evaluated images themselves; selecting against P@1's own "
                            "distractors would inflate it, give other images (e.g. world:train)")
    if args.captioner is not None and not args.captioner.is_dir():
        raise UserError(f"--captioner {args.captioner}: no such directory")
    if args.captions is not None and not args.captions.is_file():
        raise UserError(f"--captions {args.captions}: no such file")
    if args.captions is not None:
        read_results(args.captions)  # its entries (and their lengths) checked before any model loads
    check_retriever_arguments(args)
    spec = parse_dataset_spec(args.dataset)
    world_json = args.world_dir / "world.json"
    if spec["kind"] == "world" and world_json.is_file() and not args.text_only:  # cheap: the split's size, before the models load
        from raycap.data.world import WorldConfig

        try:
            data = json.loads(world_json.read_text())
        except ValueError as e:
            raise UserError(f"{world_json}: not valid JSON ({e})") from None
        split = spec["split"]
        if split in ("train", "labelled", "val", "test"):
            size = WorldConfig.parse(data, str(world_json)).split_size(split)
            if size < MIN_IMAGES:
                raise UserError(f"{world_json}: the {split} split has {size} images; P@1 needs at least "
                                f"{MIN_IMAGES}")
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.save_captions is not None:
        check_output_file(args.save_captions, "--save-captions")
    if args.image_root is not None and spec["kind"] in ("world", "folder"):
        raise UserError(f"--image-root {args.image_root}: a {spec['kind']} dataset has no image root to move")
    if args.image_root is not None and not args.image_root.is_dir() and not args.text_only:
        raise UserError(f"--image-root {args.image_root}: no such directory")


def run_evaluation(args) -> dict:
    """The evaluation `args` (this module's parser) ask for: checked first, then computed; `--json` and
    `--save-captions` written. Returns the metrics with the examples (the captions are in the saved file)."""
    check_arguments(args)  # before any model loads, and the output paths before the evaluation runs
    quiet_library_progress()
    with bad_images_named_by_flag():
        result = evaluate_dataset(args)
    entries = result.pop("captions")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.save_captions:
        args.save_captions.parent.mkdir(parents=True, exist_ok=True)
        args.save_captions.write_text(json.dumps(entries))
    return result


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        result = run_evaluation(args)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    if "collapse_warning" in result:
        print(f"warning: {result['collapse_warning']}", file=sys.stderr)
    if args.save_captions:
        print(f"captions: {args.save_captions} (COCO results format)")
    return result


if __name__ == "__main__":
    main()
else:  # `raycap.evaluate(captioner=..., dataset=...)` (the Python API) calls this module
    from raycap.commands import make_callable

    make_callable(__name__, "raycap.api:evaluate")
