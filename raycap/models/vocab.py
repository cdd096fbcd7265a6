"""The LM-to-CLIP token map: how Gumbel-softmax captions in the captioner's vocabulary reach the frozen CLIP
text encoder, whose BPE is another vocabulary.

Built once from the two tokenizers: each LM token's text is re-tokenized by the retriever's tokenizer into its
CLIP pieces (up to `max_pieces`); the LM's end tokens map to CLIP's end of text. A soft caption (N, T, V_lm)
becomes CLIP input embeddings by spreading each position over the pieces of the token it emits: piece j of
position t is `probs[t] @ E[piece_j]`, where `piece_j[v]` is the j-th CLIP piece of LM token v (zero for tokens
with fewer pieces) and E the CLIP token embedding. How many pieces a position expands to is read from its
emitted (argmax) token, so with straight-through one-hots the forward pass is exactly CLIP's embedding of the
decoded text wherever the text re-tokenizes piece by piece, and the gradient reaches every LM token through its
own pieces.

Exactness: a token that starts a word (GPT-2's leading space, or the caption's first token) and whose text CLIP
splits into whole-word pieces is exact; a token that continues a word ("ing" after "runn") cannot be, since CLIP
merges across the LM's boundary: it maps to the pieces of its text alone, an approximation counted in
`coverage()`. When both sides share one vocabulary (the shapes world) the map is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenMap:
    pieces: Tensor           # (V_lm, K) CLIP ids of each LM token's pieces, -1 past its last piece
    counts: Tensor           # (V_lm,) pieces per token (0 for tokens CLIP reads as nothing)
    word_start: Tensor       # (V_lm,) bool: the token's text starts a word
    prefix: list[int]        # CLIP ids that open every text (open_clip's <start_of_text>; none in the world)
    eot: int                 # CLIP's end of text
    identity: bool = False

    @property
    def lm_vocab(self) -> int:
        return self.pieces.shape[0]

    def coverage(self) -> dict:
        """Share of LM tokens mapped at all, in one piece, and exactly (a word start, whole CLIP pieces)."""
        n = self.lm_vocab
        mapped = self.counts > 0
        return {"lm_tokens": n, "mapped": float(mapped.float().mean()),
                "single_piece": float((self.counts == 1).float().mean()),
                "word_start": float((mapped & self.word_start).float().mean()),
                "max_pieces": int(self.pieces.shape[1]), "identity": self.identity}

    def to_clip(self, probs: Tensor, lengths: Tensor, token_embedding: Tensor,
                max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Soft LM captions (N, T, V_lm), whose last position (`lengths - 1`) holds the end token, -> CLIP input
        embeddings (N, L, D) and each row's end-of-text index (N,), differentiable in `probs`. Pieces past
        `max_length` - 1 (the text tower's context, less the end of text) are cut, as CLIP's tokenizer cuts."""
        if self.identity:
            return probs.to(token_embedding.dtype) @ token_embedding, lengths - 1
        N, dev, D = probs.shape[0], probs.device, token_embedding.shape[1]
        emitted = probs.argmax(-1).cpu()
        counts, lengths_cpu = self.counts.cpu(), lengths.cpu()
        entries = []  # (row, lm position, piece, clip position)
        eot_pos = []
        for n in range(N):
            pos = len(self.prefix)
            for t in range(int(lengths_cpu[n]) - 1):
                for j in range(int(counts[emitted[n, t]])):
                    if max_length is not None and pos >= max_length - 1:
                        break
                    entries.append((n, t, j, pos))
                    pos += 1
            eot_pos.append(pos)
        L = max(eot_pos) + 1
        x = torch.zeros(N, L, D, dtype=token_embedding.dtype, device=dev)
        if self.prefix:
            x[:, : len(self.prefix)] = token_embedding[torch.tensor(self.prefix, device=dev)]
        pieces = self.pieces.to(dev)
        if entries:
            e = torch.tensor(entries, device=dev)
            for j in range(pieces.shape[1]):
                sel = e[e[:, 2] == j]
                if not len(sel):
                    continue
                table = token_embedding[pieces[:, j].clamp(min=0)] * (pieces[:, j] >= 0)[:, None]  # (V_lm, D)
                # under autocast the product is bf16 while x holds the embedding's dtype: cast it to x's
                spread = probs[sel[:, 0], sel[:, 1]].to(table.dtype) @ table
                x = x.index_put((sel[:, 0], sel[:, 3]), spread.to(x.dtype))
        rows = torch.arange(N, device=dev)
        end = probs[rows, (lengths - 1).to(dev)].sum(-1, keepdim=True)  # the end position's weight, 1 forward
        eot = torch.tensor(eot_pos, device=dev)
        x = x.index_put((rows, eot), end.to(x.dtype) * token_embedding[self.eot])
        return x, eot


def build_token_map(lm_tokenizer, retriever, stop_ids=(), max_pieces: int = 4) -> TokenMap:
    """The map from the captioner's tokenizer to the retriever's; the identity when they share a vocabulary."""
    clip_tok = retriever.tokenizer
    if lm_tokenizer is clip_tok or (hasattr(clip_tok, "get_vocab") and hasattr(lm_tokenizer, "get_vocab")
                                    and lm_tokenizer.get_vocab() == clip_tok.get_vocab()):
        V = len(lm_tokenizer)
        return TokenMap(torch.arange(V)[:, None], torch.ones(V, dtype=torch.long), torch.ones(V, dtype=torch.bool),
                        [], int(retriever.tokenize(["x"])[0].max()), identity=True)
    V = len(lm_tokenizer)
    texts = [lm_tokenizer.decode([v]) for v in range(V)]
    probe = retriever.tokenize([""])[0]  # what CLIP makes of an empty text: its prefix and end of text
    eot = int(probe.max())
    prefix = [int(t) for t in probe[probe != 0] if int(t) != eot]
    ids = retriever.tokenize([t.strip() for t in texts])
    pieces = torch.full((V, max_pieces), -1, dtype=torch.long)
    counts = torch.zeros(V, dtype=torch.long)
    special = set(stop_ids) | set(getattr(lm_tokenizer, "all_special_ids", []))
    for v in range(V):
        if v in special:
            continue
        row = [int(t) for t in ids[v] if int(t) != 0][len(prefix):]
        row = [t for t in row if t != eot][:max_pieces]
        pieces[v, : len(row)] = torch.tensor(row, dtype=torch.long)
        counts[v] = len(row)
    word_start = torch.tensor([t[:1].isspace() for t in texts])
    return TokenMap(pieces, counts, word_start, prefix, eot)


def mapped_ids(token_map: TokenMap, lm_ids: list[int]) -> list[int]:
    """The CLIP ids the map gives a hard caption (its LM ids, without the end token): prefix, pieces, end."""
    out = list(token_map.prefix)
    for v in lm_ids:
        out += [int(t) for t in token_map.pieces[v, : int(token_map.counts[v])]]
    return out + [token_map.eot]


def caption_exactness(token_map: TokenMap, lm_tokenizer, retriever, captions: list[str]) -> float:
    """Share of captions (as the LM tokenizes them) whose mapped CLIP ids equal CLIP's own tokenization of the
    text: the captions for which a one-hot soft caption gives exactly the decoded text's CLIP embedding."""
    if not captions:
        return float("nan")
    clip = retriever.tokenize(captions)
    hits = 0
    for k, c in enumerate(captions):
        ids = lm_tokenizer(c, add_special_tokens=False)["input_ids"]
        own = [int(t) for t in clip[k] if int(t) != 0]
        hits += mapped_ids(token_map, ids) == own
    return hits / len(captions)
