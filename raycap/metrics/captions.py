"""Caption metrics: BLEU-1..4 / METEOR / ROUGE-L / CIDEr against references (pycocoevalcap's COCOEvalCap
computation, PTB tokenizer included), CLIPScore, RefCLIPScore and RefCompare with the frozen retriever, and
vocabulary statistics. SPICE needs Stanford CoreNLP, which cannot be
downloaded here: it is reported as unavailable with the reason, never as 0."""
from __future__ import annotations

import shutil
from typing import Sequence

import numpy as np
import torch

SPICE_UNAVAILABLE = "SPICE needs Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; " \
                    "this machine has no internet access"


JAVA_UNAVAILABLE = "pycocoevalcap's PTB tokenizer and METEOR run on Java, and no `java` is on the PATH"


def ngram_metrics(captions: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of captions against their references, exactly as pycocoevalcap's
    `COCOEvalCap` computes them: its Stanford PTB tokenizer (Java) on both sides, then its scorers. Without Java
    the metrics are listed in `unavailable` with the reason, never reported as 0."""
    if not shutil.which("java"):
        names = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"] + (["meteor"] if meteor else [])
        return {"unavailable": {name: JAVA_UNAVAILABLE for name in names}}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        out["meteor"] = float(m.compute_score(gts, res)[0])
        del m  # its __del__ stops the METEOR Java process
    return out


@torch.no_grad()
def clip_metrics(retriever, captions: Sequence[str], image_emb: torch.Tensor,
                 references: Sequence[Sequence[str]] | None = None, text_emb: torch.Tensor | None = None) -> dict:
    """CLIPScore, RefCLIPScore (Hessel et al. 2021) and RefCompare, all with the frozen retriever's embeddings.

    CLIPScore = 2.5 * max(cos(caption, image), 0). RefCLIPScore = the harmonic mean of CLIPScore and
    max(max over references of cos(caption, reference), 0), per image (0 where both are 0). RefCompare: per
    image, the share of its references whose CLIP score is lower than the generated caption's (>= 0.5: as good
    as the references). Each is the mean over images. `text_emb`: the captions' embeddings when already encoded.
    The captions are encoded as they are (no "A photo depicts"
    prompt: the world's retriever was never trained on one)."""
    text = retriever.encode_captions(list(captions)) if text_emb is None else text_emb
    cos = (text * image_emb).sum(-1)
    clip_s = 2.5 * cos.clamp(min=0)
    out = {"clipscore": float(clip_s.mean())}
    if references is not None:
        k = torch.tensor([len(r) for r in references])
        ref_emb = retriever.encode_captions([r for refs in references for r in refs])
        owner = torch.arange(len(k)).repeat_interleave(k)
        ref_cos = (ref_emb * image_emb[owner]).sum(-1)
        shares = [float((rc < c).float().mean()) for rc, c in zip(ref_cos.split(k.tolist()), cos)]
        out["refcompare"] = float(np.mean(shares))
        text_ref = torch.stack([s.max() for s in (ref_emb * text[owner]).sum(-1).split(k.tolist())]).clamp(min=0)
        denominator = clip_s + text_ref
        harmonic = torch.where(denominator > 0, 2 * clip_s * text_ref / denominator.clamp(min=1e-12), 0.0)
        out["refclipscore"] = float(harmonic.mean())
    return out


COLLAPSE_SHARE = 0.2  # one caption for more than a fifth of the images: the captioner has collapsed


def distinct_n(captions: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams of all captions (lower-cased words)."""
    grams = [tuple(w[k:k + n]) for c in captions for w in [c.lower().split()] for k in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def vocabulary_metrics(captions: Sequence[str]) -> dict:
    """Diversity: vocabulary size, distinct-1/2, the share of unique captions, the most frequent caption and its
    share, and a `collapse_warning` when that share exceeds COLLAPSE_SHARE."""
    from collections import Counter

    words = [w for c in captions for w in c.split()]
    top, count = Counter(captions).most_common(1)[0] if captions else ("", 0)
    share = count / max(1, len(captions))
    out = {"vocab_size": len(set(words)), "unique_caption_ratio": len(set(captions)) / max(1, len(captions)),
           "mean_length": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0,
           "distinct_1": distinct_n(captions, 1), "distinct_2": distinct_n(captions, 2),
           "top_caption": top, "top_caption_share": share}
    if share > COLLAPSE_SHARE:
        out["collapse_warning"] = (f"captions collapsed: {share:.0%} of the images get the same caption "
                                   f"({top!r})")
    return out
