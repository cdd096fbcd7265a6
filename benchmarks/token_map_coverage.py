"""Coverage of the LM-to-CLIP token map (`raycap.models.vocab`) between a byte-level BPE trained locally on the
shipped world's labelled references (as examples/make_bpe_lm.py trains it) and open_clip's real CLIP BPE
(49,408 tokens; its vocabulary ships with open_clip, so a tiny random CLIP carries the real tokenizer), and
between the same BPE and the world retriever's word-level vocabulary. Prints the share of LM tokens mapped, in
one piece, starting a word, and the share of test references the map covers exactly.

    python benchmarks/token_map_coverage.py
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from raycap.config import ASSETS_DIR
from raycap.inputs import load_world
from raycap.models.bpe import train_bpe
from raycap.models.clip import Retriever
from raycap.models.vocab import build_token_map, caption_exactness


def real_clip_bpe_retriever(directory: Path) -> Retriever:
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1,
                                           "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(open_clip.CLIP(**cfg).state_dict(), str(directory / "open_clip_model.safetensors"))
    return Retriever.from_open_clip(f"local-dir:{directory}").eval()


def main() -> None:
    world = load_world(None)
    texts = [r for i in range(world.config.n_labelled) for r in world.references("labelled", i)]
    test_refs = list(dict.fromkeys(r for i in range(world.config.n_test) for r in world.references("test", i)))
    full = list(dict.fromkeys(world.scene("test", i).full_description for i in range(world.config.n_test)))
    tok = train_bpe(texts, 512)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        targets = {"open_clip CLIP BPE (49,408)": real_clip_bpe_retriever(Path(d)),
                   "world retriever (word-level)": Retriever.from_pretrained(ASSETS_DIR / "world" / "retriever")}
        for name, retriever in targets.items():
            m = build_token_map(tok, retriever, stop_ids=[tok.eos_token_id])
            cov = m.coverage()
            print(f"BPE ({len(tok)} tokens) -> {name}: mapped {cov['mapped']:.3f}, one piece "
                  f"{cov['single_piece']:.3f}, word start {cov['word_start']:.3f}; exact on "
                  f"{caption_exactness(m, tok, retriever, test_refs):.3f} of {len(test_refs)} distinct test references, "
                  f"{caption_exactness(m, tok, retriever, full):.3f} of {len(full)} distinct full descriptions")


if __name__ == "__main__":
    main()
