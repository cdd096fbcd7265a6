"""Train the world's tiny ClipCap with cross-entropy on the labelled split's vague references, and evaluate
a captioner on a world split (retrieval P@1 among 100 by the frozen retriever, and the caption checks)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raycap.data.grammar import caption_checks
from raycap.data.world import World
from raycap.metrics.captions import vocabulary_metrics
from raycap.metrics.results import coco_results
from raycap.metrics.retrieval import candidate_sets, p_at_1
from raycap.models.clip import Retriever
from raycap.models.captioner import Captioner
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.tokenizers import decode, encode
from raycap.progress import progress
from raycap.supervised.world_lm import load_world_lm


@dataclass
class CaptionerTraining:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    prefix_length: int = 4
    lm: dict = field(default_factory=lambda: {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 64,
                                              "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    max_new_tokens: int = 40
    seed: int = 0
    image_input: str = "embedding"  # "tokens": the retriever's patch tokens through a token mapper
    mapper: str = "mlp"  # over the embedding: "mlp" or "transformer" (ClipCap's two mappers)
    mapper_layers: int = 4  # the Transformer or token mapper's layers
    lm_init: str | None = None  # a `pretrain world-lm` directory: the LM starts from its text-only weights
    train_lm: bool = True  # False: the LM stays frozen (only the mapper learns), here and in any RL stage after


def world_captioner(retriever: Retriever, cfg: CaptionerTraining) -> ClipCap:
    """A ClipCap sized for the world, sharing the retriever's word vocabulary: an MLP or Transformer mapper over the
    retriever's embedding, or (`image_input: tokens`) a Transformer mapper over its patch tokens; its LM fresh, or
    the text-only world LM of `cfg.lm_init`, trained or frozen (`cfg.train_lm`). A frozen fresh LM is refused
    (ValueError): it would have no language to steer."""
    tok = retriever.tokenizer
    if not cfg.train_lm and not cfg.lm_init:
        raise ValueError("a frozen LM needs pretrained weights (a `pretrain world-lm` directory); a fresh one "
                         "knows no words")
    if cfg.image_input == "tokens" and cfg.mapper != "transformer":
        raise ValueError("the image tower's tokens are read by a Transformer mapper, not an MLP")
    lm_model = load_world_lm(Path(cfg.lm_init), tok) if cfg.lm_init else None
    if lm_model is not None:
        lm = {k: getattr(lm_model.config, k) for k in ("n_embd", "n_layer", "n_head", "n_positions")}
    else:
        lm = dict(cfg.lm)
    lm |= {"vocab_size": len(tok), "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if cfg.image_input == "tokens":
        n_tokens, width = retriever.token_shape
        reads = dict(clip_dim=width, mapper="transformer", clip_length=n_tokens, mapper_layers=cfg.mapper_layers,
                     image_input="tokens")
    elif cfg.mapper == "transformer":
        reads = dict(clip_dim=retriever.embed_dim, mapper="transformer", clip_length=cfg.prefix_length,
                     mapper_layers=cfg.mapper_layers)
    elif cfg.mapper == "mlp":
        reads = dict(clip_dim=retriever.embed_dim)
    else:
        raise ValueError(f"unknown mapper {cfg.mapper!r} (expected 'mlp' or 'transformer')")
    return ClipCap(ClipCapConfig(prefix_length=cfg.prefix_length, lm=lm, train_lm=cfg.train_lm,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 max_new_tokens=cfg.max_new_tokens, **reads), lm=lm_model)


def world_inputs(captioner, retriever: Retriever, images) -> torch.Tensor:
    """What a world captioner reads for uint8 images: the retriever's embeddings or its patch tokens."""
    if getattr(captioner, "reads_image_tokens", False):
        return retriever.encode_pixels_tokens(images)
    return retriever.encode_pixels(images)


def train_captioner(retriever: Retriever, world: World, cfg: CaptionerTraining, work_dir: Path,
                    log=print) -> ClipCap:
    """Cross-entropy on (image embedding, vague reference) pairs of the world's labelled split."""
    torch.manual_seed(cfg.seed)
    n_lab, n_val = world.config.n_labelled, min(500, world.config.n_val)
    model = world_captioner(retriever, cfg)
    emb_lab = world_inputs(model, retriever, world.images("labelled"))
    emb_val = world_inputs(model, retriever, world.images("val", range(n_val)))
    refs = [world.references("labelled", i) for i in range(n_lab)]
    val_refs = [world.references("val", i) for i in range(n_val)]
    return train_on_references(model, retriever.tokenizer, emb_lab, refs, emb_val, val_refs, cfg, work_dir, log)


MAX_VALIDATIONS = 20  # validation passes of one supervised training, the last epoch's always among them


def train_on_references(model: ClipCap, tokenizer, train_emb: torch.Tensor, train_refs: list[list[str]],
                        val_emb: torch.Tensor, val_refs: list[list[str]], cfg: CaptionerTraining, work_dir: Path,
                        log=print) -> ClipCap:
    """Cross-entropy on every (image embedding, reference) pair, AdamW with warmup and cosine decay, gradient
    clipping at 1; the validation loss after every epoch (every few epochs when there are more than
    MAX_VALIDATIONS; always after the last) goes to `work_dir/log.jsonl`. Any captioner, any tokenizer.
    The caller seeds torch (before building the model) and this draws dropout from that stream."""
    work_dir.mkdir(parents=True, exist_ok=True)
    owner = torch.from_numpy(np.repeat(np.arange(len(train_refs)), [len(r) for r in train_refs]))
    val_owner = torch.from_numpy(np.repeat(np.arange(len(val_refs)), [len(r) for r in val_refs]))
    caps, val_caps = [c for r in train_refs for c in r], [c for r in val_refs for c in r]
    ids, lengths = encode(tokenizer, caps, cfg.max_new_tokens)
    val_ids, val_lengths = encode(tokenizer, val_caps, cfg.max_new_tokens)
    log(f"captioner: {len(train_refs)} labelled images, {len(caps)} references")

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(caps) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():  # (epoch, the batch's reference indices, whether it ends the epoch), one per optimiser step
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(caps), generator=gen)
            for k in range(0, len(caps), cfg.batch_size):
                yield epoch, perm[k:k + cfg.batch_size], k + cfg.batch_size >= len(caps)

    bar = progress(batches(), total=total, desc="captioner")  # a line (or bar) per step, not per epoch
    val_every = math.ceil(cfg.epochs / MAX_VALIDATIONS)  # many short epochs (few labels): not a pass after each
    val_loss = None
    for i, (epoch, b, epoch_ends) in enumerate(bar):
        model.train()
        lp = model.log_probs(train_emb[owner[b]], ids[b], lengths[b], reduction="sum")
        loss = -lp.sum() / lengths[b].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if i % 10 == 0 and not epoch_ends:  # the loss's value is a device sync: not every step
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}",
                            **({} if val_loss is None else {"val": f"{val_loss:.3f}"}))
        if not epoch_ends or ((epoch + 1) % val_every and epoch + 1 < cfg.epochs):
            continue
        model.eval()
        with torch.no_grad():  # the validation references, cfg.batch_size at a time
            val_lp = sum(float(model.log_probs(val_emb[val_owner[k:k + cfg.batch_size]], val_ids[k:k + cfg.batch_size],
                                               val_lengths[k:k + cfg.batch_size], reduction="sum").sum())
                         for k in range(0, len(val_caps), cfg.batch_size))
            val_loss = -val_lp / float(val_lengths.sum())
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
        with (work_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps({"epoch": epoch + 1, "train_loss": loss.item(), "val_loss": val_loss}) + "\n")
    return model.eval()


EVAL_BATCH = 512  # sequences decoded at once by default (`eval.batch_size`)


@torch.no_grad()
def caption_embeddings(captioner: Captioner, tokenizer, image_emb: torch.Tensor, mode: str = "greedy",
                       num_beams: int = 5, batch_size: int = EVAL_BATCH) -> list[str]:
    """Captions decoded (greedy or beam) from image embeddings on the captioner's device, `batch_size` sequences
    (images x beams) at a time; each image's caption does not depend on the batch it is decoded in."""
    device = next(captioner.parameters()).device
    step = max(1, batch_size // (num_beams if mode == "beam" else 1))
    captions = []
    for k in range(0, len(image_emb), step):
        out = captioner.generate(image_emb[k:k + step].to(device), mode=mode, num_beams=num_beams)
        captions += decode(tokenizer, out.tokens, out.lengths, captioner.stop_ids)
    return captions


@torch.no_grad()
def world_captions(captioner: Captioner, retriever: Retriever, world: World, split: str = "test",
                   n: int | None = None, mode: str = "greedy", num_beams: int = 5, image_emb=None):
    """Captions of a split's first n images, with their image embeddings and scenes."""
    n = min(n or world.config.split_size(split), world.config.split_size(split))
    if image_emb is None:
        image_emb = retriever.encode_pixels(world.images(split, range(n)))
    inputs = retriever.encode_pixels_tokens(world.images(split, range(n))) \
        if getattr(captioner, "reads_image_tokens", False) else image_emb
    captions = caption_embeddings(captioner, retriever.tokenizer, inputs, mode, num_beams)  # one vocabulary
    return captions, image_emb, [world.scene(split, i) for i in range(n)]


@torch.no_grad()
def score_captions(captions, retriever: Retriever, image_emb, scenes, seed: int = 0, examples: int = 8,
                   references=None, text_emb=None, batch_size: int = EVAL_BATCH) -> dict:
    """Retrieval P@1 among 100 (target + 99 random images of the split, fixed seed) and vocabulary statistics;
    with `scenes` (the world's images) the world's caption checks. The first `examples` captions are listed
    beside their full descriptions (world) or references."""
    text_emb = retriever.encode_captions(captions, chunk=batch_size) if text_emb is None else text_emb
    text_emb = text_emb.float().to(image_emb.device)  # the retriever's device; the cached embeddings' may differ
    out = {"p_at_1": p_at_1(text_emb, image_emb, candidate_sets(len(captions), 100, seed))}
    if scenes is not None:
        out |= caption_checks(captions, scenes)
    out |= vocabulary_metrics(captions)
    shown = []
    for i, c in enumerate(captions[:examples]):
        item = {"caption": c}
        if scenes is not None:
            item["full"] = scenes[i].full_description
        elif references is not None:
            item["references"] = references[i]
        shown.append(item)
    return out | {"examples": shown}


def evaluate_captioner(captioner: Captioner, retriever: Retriever, world: World, split: str = "test",
                       n: int | None = None, mode: str = "greedy", seed: int = 0, examples: int = 8) -> dict:
    """Greedy captions of a world split, scored by `score_captions`."""
    captions, image_emb, scenes = world_captions(captioner, retriever, world, split, n, mode)
    return score_captions(captions, retriever, image_emb, scenes, seed, examples)


@torch.no_grad()
def decode_images(captioner: Captioner, tokenizer, retriever: Retriever, reads: torch.Tensor, image_emb: torch.Tensor,
                  mode: str = "greedy", num_beams: int = 5, selection=None, pool: torch.Tensor | None = None,
                  batch_size: int = EVAL_BATCH) -> list[str]:
    """One caption per image: greedy, beam, or (mode "select") the best of `selection.samples` samples against the
    `pool` embeddings (`selection`: a `raycap.rl.selection.Selection`, which decodes them); `reads` is what the
    captioner reads, `image_emb` the retriever's; `batch_size` sequences are decoded at a time."""
    if mode != "select":
        return caption_embeddings(captioner, tokenizer, reads, mode, num_beams, batch_size)
    if selection is None or pool is None:
        raise ValueError("decoding 'select' needs its selection settings and a pool of other images")
    return selection.decode(captioner, tokenizer, reads, image_emb, retriever, pool, batch_size)


@torch.no_grad()
def evaluate_images(captioner: Captioner, tokenizer, retriever: Retriever, source, image_emb: torch.Tensor,
                    n: int | None = None, mode: str = "greedy", seed: int = 0, examples: int = 8,
                    inputs: torch.Tensor | None = None, num_beams: int = 5, selection=None,
                    pool: torch.Tensor | None = None, captions: list[str] | None = None,
                    batch_size: int = EVAL_BATCH, keep_captions: bool = False) -> dict:
    """Captions of the first n images of any image source (`raycap.data.sources`) from their cached embeddings
    (or `inputs`, what the captioner reads when not those), decoded by `decode_images` (or given), scored by
    `score_captions`; the world's checks when the source knows its scenes. `keep_captions`: the captions too,
    under "captions" in COCO results format."""
    n = min(n or len(source), len(source))
    image_emb = image_emb[:n]
    if captions is None:
        captions = decode_images(captioner, tokenizer, retriever, (image_emb if inputs is None else inputs)[:n],
                                 image_emb, mode, num_beams, selection, pool, batch_size)
    scenes = source.scenes
    scenes = None if scenes is None else scenes[:n]
    refs = [source.references(i) for i in range(min(n, examples))] if source.labelled else None
    result = score_captions(captions, retriever, image_emb, scenes, seed, examples, refs, batch_size=batch_size)
    if keep_captions:
        result["captions"] = coco_results(source.ids[:n], captions)
    return result | {"n_images": n}
