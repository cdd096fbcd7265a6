"""A byte-level BPE tokenizer trained locally with HF `tokenizers` (GPT-2's scheme), for captioners whose LM
is not the world's word-level one and for machines that cannot download GPT-2's files. Saved and loaded as an
ordinary HF tokenizer directory."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END = "<|endoftext|>"  # GPT-2's end of text: eos, bos and pad


def train_bpe(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with GPT-2's pre-tokenizer and decoder ("Ġ" marks a leading space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, bos_token=END, pad_token=END, unk_token=END)
