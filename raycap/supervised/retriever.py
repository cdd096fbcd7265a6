"""Train the world retriever contrastively (InfoNCE) with attribute-swapped hard negatives (NegCLIP).

Each step: a batch of images; for each, one positive text (the full description or a partial one) and
`hard_negatives` false variants of it. Image->text softmax runs over all positives and negatives of the
batch, text->image over the batch's images. The batch for step t is a function of (seed, t), so a resumed run
sees exactly the data an uninterrupted one would.

Two recipes for the other texts of the batch that are also true of an image (a partial description fits several
images): `mask_true_texts` (world v1) masks them out instead of pushing them away, so a text true of every image
("a shape") is never pushed from any and scores level with a full description; without it (world v2, as CLIP
trains: every other pair of the batch is a negative) the optimum scores a pair by how much more likely the text
is for this image than for any (a pointwise mutual information), so a more specific true text scores higher and
a text true of every image scores low, which is what both methods lean on in a real CLIP. World v2 also gives
each positive `less_specific` of its one-attribute-less versions (true, vaguer texts) as negatives of its own
image, so a true text scores above the same text with an attribute left out, the order CLIP shows between a
detailed caption and a vaguer one.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raycap.data import descriptions as D
from raycap.data.world import World
from raycap.metrics.retrieval import binding_accuracy, candidate_sets, p_at_1
from raycap.models.clip import Retriever
from raycap.models.torch_io import load_tensors
from raycap.progress import progress


@dataclass
class RetrieverTraining:
    steps: int = 4000
    batch_size: int = 256
    hard_negatives: int = 3
    p_full: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 200
    min_lr_ratio: float = 0.05
    eval_every: int = 500
    eval_images: int = 500
    checkpoint_every: int = 100
    bf16: bool = True  # CPU autocast (the loss stays fp32); v2's wider towers run faster in fp32 on CPUs without bf16 units
    seed: int = 0
    mask_true_texts: bool = True  # world v1's recipe (other true texts masked, not pushed away); v2: False
    less_specific: int = 0  # per positive, this many of its one-attribute-less versions as its image's negatives


def recipe(version: int, **settings) -> RetrieverTraining:
    """The retriever's training recipe of a world version (`settings` override it)."""
    base = {1: {}, 2: {"mask_true_texts": False, "less_specific": 2, "bf16": False}}[version]
    return RetrieverTraining(**{**base, **settings})


def lr_at(step: int, cfg: RetrieverTraining) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def evaluate_retriever(retriever: Retriever, world: World, split: str, n: int | None = None, seed: int = 0) -> dict:
    """P@1 among 100 (full descriptions; vague references, all of them), binding accuracy."""
    was_training = retriever.training
    retriever.eval()
    n = min(n or world.config.split_size(split), world.config.split_size(split))
    scenes = [world.scene(split, i) for i in range(n)]
    image_emb = retriever.encode_pixels(world.images(split, range(n)))
    cands = candidate_sets(n, 100, seed)
    full = retriever.encode_captions([s.full_description for s in scenes])
    refs = [world.references(split, i) for i in range(n)]
    vague = [p_at_1(retriever.encode_captions([r[k] for r in refs]), image_emb, cands) for k in range(len(refs[0]))]
    out = {"p_at_1_full": p_at_1(full, image_emb, cands), "p_at_1_vague": float(np.mean(vague)),
           "binding_accuracy": binding_accuracy(retriever, scenes, image_emb)}
    retriever.train(was_training)
    return out


class BatchMaker:
    """Texts, truth mask and targets of one training step."""

    def __init__(self, world: World, cfg: RetrieverTraining):
        self.world, self.cfg = world, cfg
        self.scenes = world.scenes("train")
        self.truth = D.TruthTable(world.config)
        self.scene_ids = self.truth.scenes(self.scenes)

    def __call__(self, step: int):
        cfg, wc = self.cfg, self.world.config
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(self.scenes), size=cfg.batch_size, replace=False)
        positives, negatives = [], []
        for b, i in enumerate(idx):
            scene = self.scenes[i]
            pos = D.full(scene) if rng.random() < cfg.p_full else D.partial(scene, rng)
            positives.append(pos)
            negatives += D.negatives(pos, scene, wc, rng, cfg.hard_negatives)
            if cfg.less_specific:
                vaguer = D.dropped(pos)
                picks = rng.choice(len(vaguer), size=min(cfg.less_specific, len(vaguer)), replace=False)
                negatives += [vaguer[k] for k in sorted(picks.tolist())]
        descs = positives + negatives
        truth = torch.from_numpy(self.truth(descs, self.scene_ids[idx]))  # (texts, images)
        return idx, [D.render(d) for d in descs], truth


def contrastive_loss(image_emb, text_emb, truth, logit_scale, mask_true_texts: bool = False) -> torch.Tensor:
    """Image->text over all texts and text->image over images for the positives; with `mask_true_texts` the other
    true pairs are masked out, else they are negatives like every other pair (CLIP's loss)."""
    b = image_emb.shape[0]
    logits = logit_scale * image_emb @ text_emb.T  # (B, T)
    if not mask_true_texts:
        truth = torch.zeros_like(truth)
    own = torch.zeros_like(truth.T)
    own[torch.arange(b), torch.arange(b)] = True
    i2t = logits.masked_fill(truth.T & ~own, float("-inf"))
    t2i = logits[:, :b].T.masked_fill(truth[:b] & ~own.T[:b], float("-inf"))
    target = torch.arange(b)
    return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))


def train_retriever(retriever: Retriever, world: World, cfg: RetrieverTraining, work_dir: Path,
                    log=print) -> Retriever:
    """Train in place, checkpointing to `work_dir/state.pt` and resuming from it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    state_file, log_file = work_dir / "state.pt", work_dir / "log.jsonl"
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(retriever.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state_file.exists():
        state = load_tensors(state_file)
        retriever.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"retriever: resuming from step {start} ({state_file})")
    t0 = time.time()
    images = world.images("train")
    log(f"retriever: {len(images)} training images rendered in {time.time() - t0:.1f}s")
    make_batch = BatchMaker(world, cfg)
    retriever.train()
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc="retriever")
    prefetch = ThreadPoolExecutor(1)  # step t+1's batch is built while step t computes (same batches: seeded by t)
    upcoming = prefetch.submit(make_batch, start)
    for step in bar:
        idx, texts, truth = upcoming.result()
        if step + 1 < cfg.steps:
            upcoming = prefetch.submit(make_batch, step + 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            image_emb = retriever.encode_image(retriever.pixels(images[idx]))
            text_emb = retriever.encode_captions(texts)
        loss = contrastive_loss(image_emb.float(), text_emb.float(), truth, retriever.logit_scale, cfg.mask_true_texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(retriever.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            retriever.model.logit_scale.clamp_(0, math.log(100))
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(step, cfg)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record.update(evaluate_retriever(retriever, world, "val", cfg.eval_images))
            log(f"retriever step {step + 1}: " + json.dumps(record))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or "p_at_1_full" in record:
            with log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            torch.save({"model": retriever.model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "config": asdict(cfg)}, state_file)
    prefetch.shutdown()
    retriever.eval()
    return retriever
