"""A text-only world LM: the causal LM a world captioner can start from, as ClipCap starts from GPT-2. It reads
references of scenes drawn from another seed than the world's images: no image and no pairing, only the world's
language (as GPT-2 read web text, not COCO's image-caption pairs), so a captioner whose LM is frozen still has a
language model to steer. A sequence is one text, [eos] caption [eos] (the first eos stands for its start), or with
`per_text` > 1 a short document, [eos] r1 [eos] r2 [eos] ... of several references to one scene: in the world's
references the later words of a caption do not depend on the earlier ones beyond the grammar, so an LM of single
captions never learns to read its context, while one of documents learns to repeat what the earlier captions said,
which is what a prefix steering a frozen LM needs (as web text taught GPT-2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.data.grammar import wellformed
from raycap.data.world import World, WorldConfig
from raycap.models.tokenizers import decode, encode
from raycap.progress import progress

TEXT_SEED_OFFSET = 1_000_003  # the text's scenes: the world's seed plus this (no image of the world shares one)
VAL_SCENES = 500
LM_DIR, TOKENIZER_DIR = "lm", "tokenizer"


def world_text(config: WorldConfig, n_scenes: int, per_text: int = 1, sep: str = "") -> tuple[list[str], list[str]]:
    """(train, validation) texts of `n_scenes` and VAL_SCENES further scenes of the text seed: every reference
    alone, or (`per_text` > 1) each scene's references in runs of `per_text`, joined by `sep` (the eos token)."""
    if per_text > 1 and not sep:
        raise ValueError("references joined into one text need a separator (the eos token)")
    text = World(config.model_copy(update={"seed": config.seed + TEXT_SEED_OFFSET, "n_train": n_scenes + VAL_SCENES}))
    refs = [text.references("train", i) for i in range(n_scenes + VAL_SCENES)]

    def texts(scenes):
        return [f" {sep} ".join(rs[k:k + per_text]) for rs in scenes for k in range(0, len(rs), per_text)]

    return texts(refs[:n_scenes]), texts(refs[n_scenes:])


def sequences(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids with the start eos in front, labels with -100 on padding). Padding comes after every real token,
    so under the causal mask it changes no real position's logits."""
    ids, lengths = encode(tokenizer, texts, max_length)
    start = torch.full((len(texts), 1), tokenizer.eos_token_id, dtype=torch.long)
    inputs = torch.cat([start, ids], dim=1)
    labels = torch.cat([ids, torch.full_like(start, tokenizer.pad_token_id)], dim=1)
    labels[torch.arange(labels.size(1)) >= lengths[:, None]] = -100
    return inputs[:, :-1], labels[:, :-1]


def fresh_lm(tokenizer, lm: dict) -> GPT2LMHeadModel:
    """A GPT-2 of the world captioner's size over the tokenizer's vocabulary."""
    tok = tokenizer
    return GPT2LMHeadModel(GPT2Config(**{**lm, "vocab_size": len(tok), "bos_token_id": tok.eos_token_id,
                                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))


@torch.no_grad()
def validation_loss(model: GPT2LMHeadModel, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(inputs), batch):
        logits = model(input_ids=inputs[k:k + batch], attention_mask=torch.ones_like(inputs[k:k + batch]),
                       use_cache=False).logits.float()
        lab = labels[k:k + batch]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100,
                                                         reduction="sum"))
        count += int((lab != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def sampled_texts(model: GPT2LMHeadModel, tokenizer, n: int, max_length: int, seed: int) -> list[str]:
    """`n` texts sampled from the LM after the start eos (temperature 1), in batches of 256."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(0, n, 256):
        rows = min(256, n - k)
        tokens = torch.full((rows, 1), tokenizer.eos_token_id, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        lengths = torch.full((rows,), max_length, dtype=torch.long)
        for t in range(max_length):
            probs = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits[:, -1].float().softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            nxt[done] = tokenizer.pad_token_id
            ends = ~done & (nxt == tokenizer.eos_token_id)
            lengths[ends] = t + 1
            done |= ends
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if done.all():
                break
        out += decode(tokenizer, tokens[:, 1:], lengths)
    return out


def train_world_lm(tokenizer, config: WorldConfig, lm: dict, work_dir: Path, n_scenes: int = 20000,
                   steps: int = 3000, batch_size: int = 128, lr: float = 1e-3, warmup: int = 100, seed: int = 0,
                   max_length: int = 40, per_text: int = 1) -> tuple[GPT2LMHeadModel, dict]:
    """The LM trained with cross-entropy on the text seed's references, `per_text` to a sequence (AdamW, warmup
    then cosine decay, gradient clipping at 1); its validation loss every tenth of the run goes to
    `work_dir/log.jsonl`. Returns the model and its metrics: validation loss per token, and the share of 1,000
    texts sampled up to their first eos that the world's grammar parses."""
    torch.manual_seed(seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "log.jsonl").write_text("")  # a rerun (the stage is not resumed mid-way) starts its log afresh
    train, val = world_text(config, n_scenes, per_text, tokenizer.eos_token)
    # each reference at most max_length tokens with its eos, and no more than the LM's positions
    longest = min((max_length + 1) * per_text, lm.get("n_positions", 1024) - 1)
    x, y = sequences(tokenizer, train, longest)
    vx, vy = sequences(tokenizer, val, longest)
    model = fresh_lm(tokenizer, lm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    every = max(1, steps // 10)
    bar = progress(range(steps), total=steps, desc="world LM")
    for step in bar:
        model.train()
        b = torch.randint(len(x), (batch_size,), generator=gen)
        logits = model(input_ids=x[b], attention_mask=torch.ones_like(x[b]), use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[b].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            val_loss = validation_loss(model, vx, vy)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
            with (work_dir / "log.jsonl").open("a") as f:
                f.write(json.dumps({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss}) + "\n")
    samples = sampled_texts(model, tokenizer, 1000, max_length, seed)
    metrics = {"val_loss": round(validation_loss(model, vx, vy), 4), "sampled_wellformed": wellformed(samples),
               "train_texts": len(train), "val_texts": len(val), "steps": steps, "scenes": n_scenes,
               "references_per_text": per_text,
               "text_seed": config.seed + TEXT_SEED_OFFSET, "samples": samples[:8]}
    return model.eval(), metrics


def check_world_lm_dir(path: Path, tokenizer) -> None:
    """Refuse (ValueError) what is not a `pretrain world-lm` directory, or one whose tokenizer is not `tokenizer`."""
    from raycap.models.tokenizers import load_tokenizer

    if not (path / LM_DIR / "config.json").is_file() or not (path / TOKENIZER_DIR).is_dir():
        raise ValueError(f"{path}: not a world LM directory (no {LM_DIR}/config.json or {TOKENIZER_DIR}/); make one "
                         "with `raycap pretrain world-lm --out DIR`")
    if load_tokenizer(path / TOKENIZER_DIR).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{path}: its tokenizer is not the retriever's (a world LM of another world)")


def load_world_lm(path: Path, tokenizer) -> GPT2LMHeadModel:
    """A `pretrain world-lm` directory's LM; refused (ValueError) as `check_world_lm_dir` says."""
    from raycap.models.safetensors_io import reading_weights

    check_world_lm_dir(path, tokenizer)
    with reading_weights(path / LM_DIR):
        return GPT2LMHeadModel.from_pretrained(path / LM_DIR, use_safetensors=True)
