"""Tokenizers: a word-level one for the shapes world (HF `tokenizers`), real ones (GPT-2, ...) by name or path.

Both are `PreTrainedTokenizerFast` with a pad and an eos token. The world's `<eos>` has the highest id, so
open_clip's argmax pooling finds it, and the same vocabulary serves the captioner and the retriever.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from raycap.errors import UserError

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


def world_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words`: <pad>=0, <unk>=1, the words, <eos> last."""
    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A saved tokenizer directory, or a HF name such as 'gpt2' (needs the files locally when offline)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {str(name_or_path)!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode(tok: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int | None = None,
           add_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, T) padded with pad_token_id, and lengths (N,) counting the eos if added.
    Captions longer than max_length are cut, keeping the eos as the last token."""
    rows = []
    for ids in tok(list(captions), add_special_tokens=False)["input_ids"]:
        if max_length is not None:
            ids = ids[: max_length - int(add_eos)]
        rows.append(ids + [tok.eos_token_id] if add_eos else ids)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = max([1, *lengths.tolist()])
    out = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out, lengths


def decode(tok: PreTrainedTokenizerBase, tokens: torch.Tensor, lengths: torch.Tensor,
           stop_ids: Sequence[int] = ()) -> list[str]:
    """Captions from generated ids: up to `lengths`, without the eos or stop token that ended them."""
    end = {tok.eos_token_id, *stop_ids}
    out = []
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        row = row[:n]
        if row and row[-1] in end:
            row = row[:-1]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out
