"""The retriever card: the properties of a real CLIP that both methods lean on, measured on the world's test split.

- retrieval: P@1 among 100 with the full descriptions, and with the vague references;
- binding: the full description above every variant with one attribute exchanged between two objects;
- specificity: on multi-object scenes, the full description above every true partial one that leaves out one
  attribute (a more specific true text scores higher, as in CLIP);
- generic gap: generic texts ("a shape", the world's generic references, each true one-attribute description of the
  image) below the mean of the image's references (a text true of every image is no caption);
- what the captioner can read: a small probe, trained on train images' true scenes, recovers the exact set of
  colour+shape pairs from the captioner's input per object count: a 2-layer MLP on the retriever's embedding, or
  an attention-pooling probe on its patch tokens. The probe reads scenes: a measurement, never a training signal.
"""
from __future__ import annotations

import numpy as np
import torch

from raycap.data import descriptions as D
from raycap.data.grammar import Mention
from raycap.data.world import ATTRIBUTES, GENERIC_CAPTIONS, World
from raycap.metrics.retrieval import binding_accuracy, candidate_sets, p_at_1

FIXED_GENERIC = ("a shape", "a small shape", "a large shape", *GENERIC_CAPTIONS)


def one_attribute_texts(scene) -> list[str]:
    """Each object's true descriptions that state a single attribute ("a red shape", "a circle")."""
    out = []
    for m in D.full(scene):
        for a in ("shape", "colour", "size"):
            out.append(D.render((Mention(**{b: getattr(m, b) if b == a else None for b in ATTRIBUTES}),)))
    return sorted(set(out))


def one_dropped(scene) -> list[str]:
    """The true partial descriptions that leave out exactly one attribute of one object."""
    return [D.render(d) for d in D.dropped(D.full(scene))]


def _cosines(retriever, image_emb: torch.Tensor, texts_per_image: list[list[str]]) -> list[torch.Tensor]:
    """cos(image i, each of its texts), one tensor per image; the texts are encoded in one batch."""
    flat = [t for texts in texts_per_image for t in texts]
    emb = retriever.encode_captions(flat).float()
    out, k = [], 0
    for i, texts in enumerate(texts_per_image):
        out.append(emb[k:k + len(texts)] @ image_emb[i].float())
        k += len(texts)
    return out


def colour_shape_labels(scenes, world: World) -> torch.Tensor:
    """(n, colours x shapes) multi-hot of the colour+shape pairs present in each scene."""
    colours, shapes = world.config.colours, world.config.shapes
    y = torch.zeros(len(scenes), len(colours) * len(shapes))
    for i, s in enumerate(scenes):
        for o in s.objects:
            y[i, colours.index(o.colour) * len(shapes) + shapes.index(o.shape)] = 1.0
    return y


class TokenSetProbe(torch.nn.Module):
    """A small probe over a set of tokens: one learned query per colour+shape pair attends over the (normalised,
    projected) tokens, and a 2-layer MLP turns what it read into that pair's logit."""

    def __init__(self, width: int, pairs: int, hidden: int = 128, heads: int = 4):
        super().__init__()
        self.norm, self.proj = torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden)
        self.queries = torch.nn.Parameter(torch.randn(pairs, hidden) * 0.02)
        self.attn = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, width) -> (B, pairs)
        kv = self.proj(self.norm(tokens))
        read, _ = self.attn(self.queries.expand(len(tokens), -1, -1), kv, kv, need_weights=False)
        return self.head(read).squeeze(-1)


def probe_exact_sets(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     hidden: int = 256, epochs: int | None = None, seed: int = 0) -> torch.Tensor:
    """Bool (n_test,): a probe trained on (train_x, train_y) gets each test scene's exact pair set. Vectors (n, d):
    a 2-layer MLP (30 epochs); token sets (n, T, width): a `TokenSetProbe` (10 epochs, one-cycle learning rate),
    which reads the tokens as a set rather than flattened."""
    torch.manual_seed(seed)
    tokens = train_x.dim() == 3
    train_x, test_x = train_x.float(), test_x.float()
    if tokens:
        probe, epochs = TokenSetProbe(train_x.shape[-1], train_y.shape[1]), epochs or 10
        x, tx = train_x, test_x
    else:
        epochs = epochs or 30
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        probe = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, train_y.shape[1]))
        x, tx = (train_x - mean) / std, (test_x - mean) / std
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    batches = torch.arange(len(x)).split(256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * len(batches)) if tokens else None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    with torch.no_grad():
        pred = torch.cat([probe(tx[k:k + 1024]) for k in range(0, len(tx), 1024)]) > 0
    return (pred == test_y.bool()).all(1)


@torch.no_grad()
def _encode_inputs(retriever, world: World, split: str, n: int, tokens: bool, chunk: int = 512) -> torch.Tensor:
    """What a captioner reads of n images: the retriever's embeddings, or its patch tokens."""
    encode = retriever.encode_pixels_tokens if tokens else retriever.encode_pixels
    return torch.cat([encode(world.images(split, range(k, min(k + chunk, n)))) for k in range(0, n, chunk)])


def retriever_card(retriever, world: World, n: int = 1000, probe_images: int = 20000, image_tokens: bool = False,
                   seed: int = 0) -> dict:
    """The card of a world retriever on `n` test images (`probe_images` train images for the probe; 0 skips it).
    `image_tokens`: the captioner reads the retriever's patch tokens instead of its embedding."""
    retriever.eval()
    n = min(n, world.config.split_size("test"))
    scenes = [world.scene("test", i) for i in range(n)]
    with torch.no_grad():
        card = _text_side(retriever, world, scenes, seed)
    counts = torch.tensor([len(s.objects) for s in scenes])
    if probe_images:
        m = min(probe_images, world.config.split_size("train"))
        exact = probe_exact_sets(_encode_inputs(retriever, world, "train", m, image_tokens),
                                 colour_shape_labels(world.scenes("train")[:m], world),
                                 _encode_inputs(retriever, world, "test", n, image_tokens),
                                 colour_shape_labels(scenes, world), seed=seed)
        card["probe_input"] = "image_tokens" if image_tokens else "embedding"
        for k in (1, 2, 3):
            if (counts == k).any():
                card[f"probe_exact_{k}_objects"] = float(exact[counts == k].float().mean())
    return card


def _text_side(retriever, world: World, scenes: list, seed: int = 0) -> dict:
    """Retrieval, binding, specificity and the generic gap on `scenes` (the first test images)."""
    n = len(scenes)
    image_emb = retriever.encode_pixels(world.images("test", range(n)))
    cands = candidate_sets(n, 100, seed)
    refs = [world.references("test", i) for i in range(n)]
    full = retriever.encode_captions([s.full_description for s in scenes])
    card = {"images": n, "p_at_1_full": p_at_1(full, image_emb, cands),
            "p_at_1_vague": float(np.mean([p_at_1(retriever.encode_captions([r[k] for r in refs]), image_emb, cands)
                                           for k in range(len(refs[0]))])),
            "binding_accuracy": binding_accuracy(retriever, scenes, image_emb)}
    full_cos = (full.float() * image_emb.float()).sum(-1)
    ref_cos = torch.stack([c.mean() for c in _cosines(retriever, image_emb, refs)])
    # specificity: full above every true one-attribute-less partial, on scenes of 2+ objects (and by count)
    dropped = _cosines(retriever, image_emb, [one_dropped(s) for s in scenes])
    above = torch.tensor([bool(full_cos[i] > d.max()) for i, d in enumerate(dropped)])
    counts = torch.tensor([len(s.objects) for s in scenes])
    multi = counts >= 2
    card["specificity_multi_object"] = float(above[multi].float().mean()) if multi.any() else float("nan")
    for k in (1, 2, 3):
        if (counts == k).any():
            card[f"specificity_{k}_objects"] = float(above[counts == k].float().mean())
    # generic gap: every generic text below the mean of the image's references
    fixed = _cosines(retriever, image_emb, [list(FIXED_GENERIC)] * n)
    single = _cosines(retriever, image_emb, [one_attribute_texts(s) for s in scenes])
    generic_max = torch.stack([torch.maximum(f.max(), s.max()) for f, s in zip(fixed, single)])
    card["generic_below_references"] = float((generic_max < ref_cos).float().mean())
    card["fixed_generic_below_references"] = float((torch.stack([f.max() for f in fixed]) < ref_cos).float().mean())
    a_shape = torch.stack([f[0] for f in fixed])
    card["a_shape_above_full"] = float((a_shape > full_cos).float().mean())
    card["mean_cos"] = {"full": float(full_cos.mean()), "references": float(ref_cos.mean()),
                        "dropped_one": float(torch.cat(dropped).mean()), "a_shape": float(a_shape.mean())}
    return card


DATASET_GENERIC = ("a photo", "an image", "a picture", "a photo of something", "an image of an object")


@torch.no_grad()
def dataset_card(retriever, image_emb: torch.Tensor, references: list[list[str]],
                 generic: tuple[str, ...] = DATASET_GENERIC, seed: int = 0) -> dict:
    """The part of the card any retriever has on any labelled data (no scenes to judge by): P@1 among 100 with
    each image's first reference, and the generic gap (every generic text below the mean cosine of the image's
    references, as in a real CLIP)."""
    n = len(references)
    image_emb = image_emb[:n].float().to(retriever.logit_scale.device)
    cands = candidate_sets(n, 100, seed)
    first = retriever.encode_captions([r[0] for r in references]).float()
    ref_cos = torch.stack([c.mean() for c in _cosines(retriever, image_emb, references)])
    gen = retriever.encode_captions(list(generic)).float() @ image_emb.T  # (G, n)
    return {"images": n, "p_at_1_references": p_at_1(first, image_emb, cands),
            "generic_below_references": float((gen.max(0).values < ref_cos).float().mean()),
            "mean_cos": {"references": float(ref_cos.mean()), "generic": float(gen.mean())},
            "generic_texts": list(generic)}
