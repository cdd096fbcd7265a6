"""Supervised stages: `python -m raycap.pretrain world --out DIR` (the shapes world's retriever and captioner)
and `python -m raycap.pretrain captioner --config FILE.yaml --out DIR` (any ClipCap variant over any HF causal LM
and its tokenizer, on any dataset's references: raycap.supervised.captioner_stage), and `python -m raycap.pretrain
fluency --out DIR` (a fluency head on the retriever's text side for REINFORCE's fluency term: the world's labelled
references, or `--references FILE.json`, against their repeated, inserted and shuffled versions).

`world`:

(1) trains the tiny CLIP retriever (InfoNCE with attribute-swapped hard negatives), (2) trains the tiny
ClipCap captioner with cross-entropy on the labelled split's vague references, and writes
DIR/world.json, DIR/retriever/, DIR/captioner/ and DIR/metrics.json (test split: P@1 among 100, the retriever's
card: raycap.metrics.card). A new world is built with the shipped world's recipe, version 2 (CLIP's loss,
wider towers, each text's one-attribute-less versions as its image's negatives: raycap.supervised.retriever.recipe);
`--set version=1` builds the first world's (raycap/assets/world).
Re-running with the same DIR resumes: finished stages are kept, an interrupted retriever run continues
from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml

from raycap.config import check_override_key, load_yaml, parse_overrides, yaml_error
from raycap.data.world import World, WorldConfig
from raycap.errors import UserError, exit_on_user_error
from raycap.paths import check_output_dir
from raycap.progress import quiet_library_progress
from raycap.commands import prog

STAGES = ("retriever", "captioner")
SHIPPED_VERSION = 2  # the recipe of raycap/assets/world-v2, what a new world is built with unless told otherwise


def load_world_config(path: str | None, overrides: dict, out: Path) -> WorldConfig:
    data = {}
    if path:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except OSError as e:
            raise UserError(f"{path}: cannot read world config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML: {yaml_error(e)}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a world config must be a mapping of settings (see "
                            f"raycap.data.world.WorldConfig), not a {type(data).__name__}")
    for key in overrides:
        check_override_key(key, WorldConfig)
    data.update(overrides)
    saved = out / "world.json"
    previous = WorldConfig.parse(json.loads(saved.read_text()), source=str(saved)) if saved.exists() else None
    if "version" not in data:  # a new world gets the shipped recipe; a resumed one keeps its own
        data["version"] = previous.version if previous is not None else SHIPPED_VERSION
    config = WorldConfig.parse(data, source=path or "world")
    if previous is not None and previous != config:
        raise UserError(f"{saved}: the run directory was built for a different world config; "
                        "use a new --out or the same settings")
    return config


def load_world_retriever(path: Path, world_config: WorldConfig, flag: str):
    """A trained retriever whose tokenizer knows every word of the world."""
    from raycap.models.clip import Retriever

    retriever = Retriever.from_pretrained(path)
    vocab = retriever.tokenizer.get_vocab() if hasattr(retriever.tokenizer, "get_vocab") else {}
    missing = [w for w in world_config.vocabulary() if w not in vocab]
    if missing:
        raise UserError(f"{flag} {path}: its tokenizer lacks world words such as {missing[0]!r}")
    return retriever


def card(retriever, world: World, n_eval: int, args) -> dict:
    """The retriever's card on the test split (`raycap.metrics.card`), its probe reading what the captioner will."""
    from raycap.metrics.card import retriever_card

    return retriever_card(retriever.eval(), world, n_eval, probe_images=min(args.probe_images, world.config.n_train),
                          image_tokens=args.captioner_input == "tokens", seed=args.seed)


def run_fluency(args) -> dict:
    """The fluency model (a copy of the retriever's text tower, default the shipped world's, and a head) trained on
    the references (default: the world's labelled split's), written to OUT with its held-out accuracies."""
    from raycap.config import WORLD_DIR
    from raycap.models.clip import Retriever
    from raycap.supervised.fluency import train_fluency_model

    if args.fluency_steps <= 0:
        raise UserError(f"--fluency-steps: must be positive, got {args.fluency_steps}")
    if args.set or args.world_config or args.config:
        raise UserError("fluency reads --retriever and --references; --set, --world-config and --config are for "
                        "`pretrain world` and `pretrain captioner`")
    check_output_dir(args.out, "--out")
    if args.references is not None:
        try:
            references = json.loads(args.references.read_text())
        except OSError as e:
            raise UserError(f"--references {args.references}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise UserError(f"--references {args.references}: not valid JSON ({e})") from None
        if not (isinstance(references, list) and all(isinstance(r, str) for r in references)):
            raise UserError(f"--references {args.references}: must be a JSON list of caption strings")
    else:
        world = World(WorldConfig.parse(json.loads((WORLD_DIR / "world.json").read_text()), str(WORLD_DIR)))
        references = [r for i in range(world.config.n_labelled) for r in world.references("labelled", i)]
    vocabulary = sorted({w for r in references for w in r.split()})
    retriever_dir = args.retriever or WORLD_DIR / "retriever"
    if not retriever_dir.is_dir():
        raise UserError(f"--retriever {retriever_dir}: no such directory")
    quiet_library_progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    retriever = Retriever.from_pretrained(retriever_dir).eval()
    try:
        model, metrics = train_fluency_model(retriever, references, vocabulary, steps=args.fluency_steps,
                                             seed=args.seed)
    except ValueError as e:
        raise UserError(f"fluency: {e}") from None
    metrics |= {"retriever": str(retriever_dir), "steps": args.fluency_steps, "seed": args.seed}
    model.save_pretrained(args.out, metrics)
    print("fluency model (held out):", json.dumps(metrics))
    return metrics


def check_world_lm(args, world_config: WorldConfig) -> None:
    """`--lm` must be a world LM over the words of the retriever the captioner reads (`--retriever`'s, or the one
    this run trains over the world's vocabulary): refused in one line before anything is written."""
    from raycap.models.tokenizers import world_tokenizer
    from raycap.supervised.world_lm import check_world_lm_dir

    tokenizer = load_world_retriever(args.retriever, world_config, "--retriever").tokenizer \
        if args.retriever is not None else world_tokenizer(world_config.vocabulary())
    try:
        check_world_lm_dir(args.lm, tokenizer)
    except ValueError as e:
        raise UserError(f"--lm {e}") from None


def run_world_lm(args) -> dict:
    """The text-only world LM (`raycap.supervised.world_lm`) of `--world` (default the shipped world), written to
    OUT/lm and OUT/tokenizer (the world retriever's) with OUT/metrics.json."""
    from raycap.config import WORLD_DIR
    from raycap.models.clip import Retriever
    from raycap.supervised.captioner import CaptionerTraining
    from raycap.supervised.world_lm import LM_DIR, TOKENIZER_DIR, train_world_lm

    for name in ("lm_steps", "lm_scenes", "lm_documents"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.set or args.world_config or args.config or args.retriever or args.references:
        raise UserError("world-lm reads --world (a pretrained world directory); --set, --world-config, --config, "
                        "--retriever and --references are for the other stages")
    world_dir = args.world or WORLD_DIR
    for need in ("world.json", "retriever"):
        if not (world_dir / need).exists():
            raise UserError(f"--world {world_dir}: no {need} (a directory `raycap pretrain world` made)")
    check_output_dir(args.out, "--out")
    settings = {"world": str(world_dir), "seed": args.seed, "steps": args.lm_steps, "scenes": args.lm_scenes,
                "references_per_text": args.lm_documents}
    if (args.out / "metrics.json").exists():
        done = json.loads((args.out / "metrics.json").read_text())
        if "val_loss" not in done or not (args.out / LM_DIR / "config.json").is_file():
            raise UserError(f"--out {args.out}: holds a metrics.json that is not a finished world LM's; use a new --out")
        other = {k: done.get(k) for k in settings if done.get(k) != settings[k]}
        if other:
            raise UserError(f"--out {args.out}: its world LM was made with {other}, not these settings; use a new --out")
        print(f"{args.out}: the world LM is already trained")
        return done
    config = WorldConfig.parse(json.loads((world_dir / "world.json").read_text()), str(world_dir / "world.json"))
    quiet_library_progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_world_retriever(world_dir / "retriever", config, "--world").tokenizer
    t0 = time.time()
    model, metrics = train_world_lm(tokenizer, config, CaptionerTraining().lm, args.out / "work",
                                    n_scenes=args.lm_scenes, steps=args.lm_steps, seed=args.seed,
                                    per_text=args.lm_documents)
    model.save_pretrained(args.out / LM_DIR, safe_serialization=True)
    tokenizer.save_pretrained(str(args.out / TOKENIZER_DIR))
    metrics |= settings | {"train_seconds": round(time.time() - t0, 1)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("world LM (validation):", json.dumps({k: metrics[k] for k in ("val_loss", "sampled_wellformed")}))
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("raycap.pretrain"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["world", "captioner", "fluency", "world-lm"],
                   help="world: the embedded shapes world's retriever and captioner; captioner: a captioner on any "
                        "dataset (--config); fluency: a fluency head for REINFORCE's fluency term (--retriever, "
                        "--references); world-lm: a text-only LM of a world's language (--world) that a world "
                        "captioner can start from (world --lm)")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    p.add_argument("--config", help="captioner: YAML of raycap.supervised.captioner_stage.CaptionerStageConfig "
                   "(data, retriever, model, training)")
    p.add_argument("--world-config", help="YAML file with world settings (see raycap.data.world.WorldConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a world setting (world) or a config field (captioner: model.lm=DIR)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (default: all)")
    p.add_argument("--retriever", type=Path, default=None,
                   help="use this trained retriever directory instead of training one (e.g. the shipped "
                        "raycap/assets/world-v2/retriever)")
    p.add_argument("--retriever-init", type=Path, default=None,
                   help="start the retriever stage from this trained retriever's weights (e.g. the shipped one) "
                        "instead of random ones: --retriever-steps more steps on a fresh schedule")
    p.add_argument("--retriever-steps", type=int, default=3000)
    p.add_argument("--retriever-lr", type=float, default=1e-3, help="the retriever's peak learning rate")
    p.add_argument("--retriever-batch", type=int, default=256)
    p.add_argument("--hard-negatives", type=int, default=3)
    p.add_argument("--captioner-epochs", type=int, default=20)
    p.add_argument("--captioner-input", choices=["embedding", "tokens"], default="embedding",
                   help="what the world captioner reads: the retriever's 64-d embedding (an MLP mapper) or its "
                        "image tower's patch tokens (a Transformer mapper)")
    p.add_argument("--captioner-mapper", choices=["mlp", "transformer"], default="mlp",
                   help="the mapper over the retriever's embedding (ClipCap's MLP or Transformer mapper); "
                        "--captioner-input tokens always uses a Transformer")
    p.add_argument("--mapper-layers", type=int, default=4, help="the Transformer or token mapper's layers")
    p.add_argument("--lm", type=Path, default=None, help="world: start the captioner's LM from this `pretrain "
                   "world-lm` directory instead of random weights")
    p.add_argument("--freeze-lm", action="store_true", help="world: keep the captioner's LM (from --lm) frozen; only "
                   "the mapper learns, here and in RL stages after")
    p.add_argument("--world", type=Path, default=None, help="world-lm: the pretrained world directory whose language "
                   "and tokenizer the LM learns (default: the shipped world)")
    p.add_argument("--lm-steps", type=int, default=2000, help="world-lm: training steps of 128 texts")
    p.add_argument("--lm-scenes", type=int, default=20000, help="world-lm: scenes (5 references each) of the text")
    p.add_argument("--lm-documents", type=int, default=3, help="world-lm: references of one scene per training "
                   "sequence, eos between them (1: every reference alone; an LM of single references never learns "
                   "to read its context, so a prefix cannot steer it frozen)")
    p.add_argument("--references", type=Path, default=None, help="fluency: a JSON list of reference captions "
                   "(default: the shipped world's labelled references)")
    p.add_argument("--fluency-steps", type=int, default=1000, help="fluency: training steps of 128 references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--eval-images", type=int, default=None, help="test images to evaluate on (default: all)")
    p.add_argument("--probe-images", type=int, default=20000, help="train images the retriever card's probe learns "
                   "from (0: no probe)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # DeepSpeed, which transformers imports to save a model, is told the accelerator instead of guessing it aloud
        # ("Setting accelerator to CPU. If you have GPU ... unable to detect it")
        os.environ["DS_ACCELERATOR"] = "cpu"
    with exit_on_user_error():
        return run(args)


def run(args) -> dict:
    if args.dataset == "captioner":
        from raycap.supervised.captioner_stage import load_stage_config, run_captioner_stage

        if not args.config:
            raise UserError("captioner: --config FILE.yaml is required (sections data, retriever, model, training)")
        check_output_dir(args.out, "--out")
        cfg = load_stage_config(args.config, args.set)
        quiet_library_progress()
        return run_captioner_stage(cfg, args.out)
    if args.dataset != "world" and (args.lm is not None or args.freeze_lm or args.captioner_mapper != "mlp"):
        raise UserError("--lm, --freeze-lm and --captioner-mapper are for `pretrain world`")
    if args.dataset == "fluency":
        return run_fluency(args)
    if args.dataset == "world-lm":
        return run_world_lm(args)
    if args.world is not None:
        raise UserError("--world is for `pretrain world-lm`; the world takes --world-config and --set")
    if args.freeze_lm and args.lm is None:
        raise UserError("--freeze-lm: needs --lm DIR (a `pretrain world-lm` directory); a fresh LM knows no words")
    if args.lm is not None and not (args.lm / "lm" / "config.json").is_file():
        raise UserError(f"--lm {args.lm}: not a world LM directory (no lm/config.json); make one with "
                        "`raycap pretrain world-lm --out DIR`")
    if args.config:
        raise UserError("--config is for `pretrain captioner`; the world takes --world-config and --set")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    for name in ("retriever_steps", "retriever_batch", "captioner_epochs", "retriever_lr"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.probe_images < 0:
        raise UserError(f"--probe-images: must be >= 0 (0: no probe), got {args.probe_images}")
    if args.retriever is not None and args.retriever_init is not None:
        raise UserError("--retriever uses a trained retriever as it is; --retriever-init trains on from one: "
                        "give one of them")
    out: Path = args.out
    check_output_dir(out, "--out")
    world_config = load_world_config(args.world_config, dict(parse_overrides(args.set)), out)
    if args.lm is not None and "captioner" in stages:
        check_world_lm(args, world_config)
    quiet_library_progress()
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text(world_config.model_dump_json(indent=2))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = World(world_config)
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    n_eval = min(args.eval_images or world_config.n_test, world_config.n_test)

    from raycap.models.clip import Retriever
    from raycap.models.tokenizers import world_tokenizer
    from raycap.supervised.retriever import evaluate_retriever

    if args.retriever is not None and not (out / "retriever").exists():
        retriever = load_world_retriever(args.retriever, world_config, "--retriever")
        retriever.save_pretrained(out / "retriever")
        metrics["retriever"] = {**evaluate_retriever(retriever, world, "test", n_eval), "source": str(args.retriever),
                                "card": card(retriever, world, n_eval, args)}
        metrics_file.write_text(json.dumps(metrics, indent=2))
        print("retriever (test):", json.dumps(metrics["retriever"]))
    if "retriever" in stages and not (out / "retriever" / "raycap_retriever.json").exists():
        from raycap.supervised.retriever import recipe, train_retriever

        cfg = recipe(world_config.version, steps=args.retriever_steps, batch_size=args.retriever_batch,
                     hard_negatives=args.hard_negatives, lr=args.retriever_lr, seed=args.seed)
        t0 = time.time()
        if args.retriever_init is not None:
            retriever = load_world_retriever(args.retriever_init, world_config, "--retriever-init")
        else:
            retriever = Retriever.for_world(world_tokenizer(world_config.vocabulary()), world_config.image_size,
                                            version=world_config.version)
        train_retriever(retriever, world, cfg, out / "work" / "retriever")
        retriever.save_pretrained(out / "retriever")
        metrics["retriever"] = {**evaluate_retriever(retriever, world, "test", n_eval),
                                "steps": cfg.steps, "train_seconds": round(time.time() - t0, 1)}
        if args.retriever_init is not None:
            metrics["retriever"]["init"] = str(args.retriever_init)
        metrics["retriever"]["card"] = card(retriever, world, n_eval, args)
        metrics_file.write_text(json.dumps(metrics, indent=2))
        print("retriever (test):", json.dumps(metrics["retriever"]))

    if "captioner" in stages and not (out / "captioner" / "raycap_clipcap.json").exists():
        from raycap.supervised.captioner import (
            CaptionerTraining,
            evaluate_captioner,
            train_captioner,
        )

        if not (out / "retriever").exists():
            raise UserError(f"{out / 'retriever'}: missing; run the retriever stage first")
        retriever = Retriever.from_pretrained(out / "retriever").freeze()
        mapper = "transformer" if args.captioner_input == "tokens" else args.captioner_mapper
        cfg = CaptionerTraining(epochs=args.captioner_epochs, seed=args.seed, image_input=args.captioner_input,
                                mapper=mapper, mapper_layers=args.mapper_layers,
                                lm_init=None if args.lm is None else str(args.lm), train_lm=not args.freeze_lm)
        t0 = time.time()
        captioner = train_captioner(retriever, world, cfg, out / "work" / "captioner")
        captioner.save_pretrained(out / "captioner")
        retriever.tokenizer.save_pretrained(str(out / "captioner" / "tokenizer"))
        metrics["captioner"] = {**evaluate_captioner(captioner, retriever, world, "test", n_eval),
                                "epochs": cfg.epochs, "train_seconds": round(time.time() - t0, 1),
                                "mapper": mapper, "lm": "fresh" if args.lm is None else str(args.lm),
                                "train_lm": not args.freeze_lm}
        metrics_file.write_text(json.dumps(metrics, indent=2))
        print("captioner (test):", json.dumps(metrics["captioner"]))
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    main()
