"""Caption metrics: BLEU-4 / METEOR / ROUGE-L / CIDEr against references (pycocoevalcap), CLIPScore and
RefCompare with the frozen retriever, and vocabulary statistics. SPICE needs Stanford CoreNLP, which cannot be
downloaded here: it is reported as unavailable with the reason, never as 0."""
from __future__ import annotations

import shutil
from typing import Sequence

import numpy as np
import torch

SPICE_UNAVAILABLE = "SPICE needs Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; " \
                    "this machine has no internet access"


def _prep(captions: Sequence[str]) -> list[str]:
    """Lowercase, whitespace-tokenised, a space before final punctuation (what PTBTokenizer would give)."""
    return [" ".join(c.lower().replace(".", " .").replace(",", " ,").split()) or "<empty>" for c in captions]


def ngram_metrics(captions: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True) -> dict:
    """BLEU-4, ROUGE-L, CIDEr (and METEOR when Java is present) of captions against their references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [c] for i, c in enumerate(_prep(captions))}
    gts = {i: _prep(refs) for i, refs in enumerate(references)}
    out = {"bleu4": float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
           "rouge_l": float(Rouge().compute_score(gts, res)[0]),
           "cider": float(Cider().compute_score(gts, res)[0])}
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        out["meteor"] = float(m.compute_score(gts, res)[0])
        del m
    return out


@torch.no_grad()
def clip_metrics(retriever, captions: Sequence[str], image_emb: torch.Tensor,
                 references: Sequence[Sequence[str]] | None = None) -> dict:
    """CLIPScore (2.5 * max(cos, 0), Hessel et al. 2021) and RefCompare: per image, the share of its
    references whose CLIP score is lower than the generated caption's (>= 0.5: as good as the references)."""
    cos = (retriever.encode_captions(list(captions)) * image_emb).sum(-1)
    out = {"clipscore": float((2.5 * cos.clamp(min=0)).mean())}
    if references is not None:
        k = [len(r) for r in references]
        ref_emb = retriever.encode_captions([r for refs in references for r in refs])
        ref_cos = (ref_emb * image_emb.repeat_interleave(torch.tensor(k), dim=0)).sum(-1)
        shares = [float((rc < c).float().mean()) for rc, c in zip(ref_cos.split(k), cos)]
        out["refcompare"] = float(np.mean(shares))
    return out


def vocabulary_metrics(captions: Sequence[str]) -> dict:
    words = [w for c in captions for w in c.split()]
    return {"vocab_size": len(set(words)), "unique_caption_ratio": len(set(captions)) / max(1, len(captions)),
            "mean_length": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0}
