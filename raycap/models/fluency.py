"""A fluency model on the retriever's text side (Cho et al. 2022's grammar head): a copy of the retriever whose text
tower is fine-tuned together with a small MLP head on its text embedding, trained to tell references from references
whose words were repeated, inserted or shuffled (`corruptions`). A REINFORCE reward term (`rl.reward.fluency_coef`)
adds its log-probability that a caption is fluent, so a policy cannot climb the retriever's cosine with broken text.
The frozen retriever that judges retrieval is not touched: the model has its own copy.

A fluency dir holds `raycap_fluency.json` (the head's sizes and training metrics), `fluency_head.safetensors` and
`text/` (the fine-tuned retriever copy, a raycap retriever dir).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from raycap.models.clip import Retriever
from raycap.models.safetensors_io import load_weights

CONFIG = "raycap_fluency.json"
WEIGHTS = "fluency_head.safetensors"


class FluencyModel(nn.Module):
    def __init__(self, text: Retriever, hidden: int = 256):
        super().__init__()
        self.text, self.hidden = text, hidden
        self.head = nn.Sequential(nn.Linear(text.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """(N,) logits that each caption is fluent (chunked through the text tower)."""
        emb = self.text.encode_captions(list(captions), normalize=False)
        return self.head(emb.to(self.head[0].weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def log_fluency(self, captions: Sequence[str]) -> torch.Tensor:
        """(N,) log P(fluent), computed in fp32 whatever autocast the caller runs under (the model is trained in
        fp32): near 0 for a caption the model is sure of, very negative for broken text."""
        device = self.head[0].weight.device
        with torch.autocast(device.type, enabled=False):
            return nn.functional.logsigmoid(self(captions).float())

    def save_pretrained(self, path: str | Path, metrics: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.text.save_pretrained(path / "text")
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps({"kind": "fluency", "hidden": self.hidden, "metrics": metrics or {}},
                                              indent=2))  # last: a complete dir

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FluencyModel":
        path = Path(path)
        meta = json.loads((path / CONFIG).read_text())
        model = cls(Retriever.from_pretrained(path / "text"), meta["hidden"])
        model.head.load_state_dict(load_weights(path / WEIGHTS))
        return model.eval().requires_grad_(False)


def is_fluency_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file() and (path / "text").is_dir()


def corruptions(text: str, rng: np.random.Generator, vocabulary: list[str]) -> list[str]:
    """The three broken versions of a reference the head learns to reject: a word repeated in place, a random
    vocabulary word inserted, the words shuffled (each differs from the reference where the text allows)."""
    words = text.split()
    i = int(rng.integers(len(words)))
    repeated = words[:i + 1] + [words[i]] * int(rng.integers(1, 3)) + words[i + 1:]
    j = int(rng.integers(len(words) + 1))
    inserted = words[:j] + [vocabulary[int(rng.integers(len(vocabulary)))]] + words[j:]
    shuffled = list(words)
    for _ in range(5):  # a permutation that moves something, when the words are not all the same
        shuffled = [words[k] for k in rng.permutation(len(words))]
        if shuffled != words:
            break
    return [" ".join(repeated), " ".join(inserted), " ".join(shuffled)]
