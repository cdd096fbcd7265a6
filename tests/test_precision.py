"""bf16 autocast (issue 27, item 5): greedy captions in bf16 agree with fp32 on most images of the shipped world,
and `runtime.precision: bf16` runs the update's forward passes in bf16 over fp32 weights."""
import math

import torch

from raycap.config import WORLD_DIR
from raycap.models.loading import load_world_dir
from raycap.models.precision import autocast
from raycap.supervised.captioner import caption_embeddings
from world_runs import records, run


def test_bf16_greedy_captions_agree_with_fp32_on_most_images():
    w = load_world_dir(WORLD_DIR)
    emb = w.retriever.encode_pixels(w.world.images("val", range(300)))
    fp32 = caption_embeddings(w.captioner, w.tokenizer, emb)
    with autocast(torch.device("cpu"), torch.bfloat16):
        bf16 = caption_embeddings(w.captioner, w.tokenizer, emb)
    share = sum(a == b for a, b in zip(fp32, bf16)) / len(fp32)
    assert 0.9 <= share < 1.0 or fp32 == bf16, share  # bf16 rounds differently, yet rarely changes a caption


def test_a_bf16_run_updates_fp32_weights_from_bf16_forward_passes(tiny_world_dir, tmp_path):
    args = ("--set", "rl.steps=2", "--set", "eval.images=100")
    run(tiny_world_dir, tmp_path / "fp32", *args, runtime="local")
    run(tiny_world_dir, tmp_path / "bf16", *args, "--set", "runtime.precision=bf16", runtime="local")
    a, b = ([r for r in records(tmp_path / name) if "loss" in r] for name in ("fp32", "bf16"))
    assert len(a) == len(b) == 2
    assert all(math.isfinite(r["loss"]) for r in b)
    assert a[0]["loss"] != b[0]["loss"]  # the forward ran in bf16
    assert abs(a[0]["kl"] - b[0]["kl"]) < 0.05 and abs(a[0]["loss"] - b[0]["loss"]) < 0.1 * abs(a[0]["loss"]) + 0.05
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "final" / "mapper.safetensors")).values()} == \
        {torch.float32}
