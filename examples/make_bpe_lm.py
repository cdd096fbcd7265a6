"""Build a fresh causal LM with a byte-level BPE tokenizer trained on a world's labelled references, saved as an
ordinary HF model directory: what a user's GPT-2 or LLaMA checkpoint looks like to raycap, made offline.

    python examples/make_bpe_lm.py --arch gpt2 --out runs/bpe-gpt2/lm
    python -m raycap.pretrain captioner --config examples/bpe-captioner.yaml --set model.lm=runs/bpe-gpt2/lm \\
        --out runs/bpe-gpt2
    python -m raycap.train --config world-demo --set captioner.path=runs/bpe-gpt2/captioner --out runs/bpe-gpt2-rl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raycap.inputs import load_world
from raycap.models.bpe import train_bpe


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--world", type=Path, default=None, help="pretrained world dir (default: the shipped one)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    world = load_world(args.world)
    texts = [r for i in range(world.config.n_labelled) for r in world.references("labelled", i)]
    tok = train_bpe(texts, args.vocab_size)
    torch.manual_seed(args.seed)
    eos = tok.eos_token_id
    if args.arch == "gpt2":  # the world captioner's size: 4 layers of 128
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=64,
                                        bos_token_id=eos, eos_token_id=eos))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos,
                                          pad_token_id=eos))
    lm.save_pretrained(args.out)
    tok.save_pretrained(str(args.out))
    print(f"wrote {args.out}: {args.arch}, {sum(p.numel() for p in lm.parameters()):,} parameters, "
          f"BPE of {len(tok)} tokens from {len(texts)} references")
    return args.out


if __name__ == "__main__":
    main()
