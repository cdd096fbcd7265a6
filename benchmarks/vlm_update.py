"""One DiscriTune update of a SmolVLM-256M-sized VLM captioner on this machine's CPU, LoRA adapters against the whole
language model: the seconds of its rollout (sampled captions) and of its update (teacher-forced REINFORCE loss with
the KL guard, backward, Adam step), the process's peak memory, and the bytes one weight sync moves
(`raycap.runtime.weights.flat_weights` of what trains). Random weights, built offline: SmolVLM-256M-Instruct's
shapes (SigLIP-B/16 at 512 px, pixel shuffle 4 -> 64 image tokens; a 30-layer, 576-wide Llama with a 49,280-token
vocabulary), a small BPE trained here as its tokenizer (captions are scored as ids; no text is decoded). Each
variant runs in its own process, so each peak is its own; prints both and their ratios.

    python benchmarks/vlm_update.py                       # 4 images x 4 samples, 16 new tokens, LoRA r=8
    python benchmarks/vlm_update.py --images 2 --samples 2 --r 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLVLM_256M = {  # HuggingFaceTB/SmolVLM-256M-Instruct's sizes
    "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49280, tie_word_embeddings=False),
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16, image_size=512),
    "scale_factor": 4, "image_seq_len": 64,
}
TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build(out: Path) -> Path:
    """A random SmolVLM-256M-sized captioner directory (raycap's VLM layout) in `out`."""
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    from raycap.models.bpe import train_bpe
    from raycap.models.vlm import VlmCaptioner, VlmCaptionerConfig

    corpus = ["a red square on a blue circle", "Describe the image.", "a small green triangle left of a star"] * 50
    tok = train_bpe(corpus, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                         "<end_of_utterance>", "<global-img>", "<|im_start|>"]})
    size = SMOLVLM_256M["vision"]["image_size"]
    images = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": size},
                                   max_image_size={"longest_edge": size})
    processor = SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                 image_seq_len=SMOLVLM_256M["image_seq_len"], chat_template=TEMPLATE)
    text = LlamaConfig(**SMOLVLM_256M["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**SMOLVLM_256M["vision"]), text_config=text,
                           scale_factor=SMOLVLM_256M["scale_factor"], image_token_id=processor.image_token_id,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config).eval()
    cap = VlmCaptioner(model, processor, VlmCaptionerConfig(prompt="Describe the image.", image_size=size,
                                                            pad_token_id=tok.pad_token_id))
    cap.save_pretrained(out)
    return out


def one_update(path: Path, variant: str, images: int, samples: int, new_tokens: int, r: int) -> dict:
    """Build the policy and its reference from `path`, then time one rollout and one update."""
    import copy

    from PIL import Image

    from raycap.config import load_config
    from raycap.models.vlm import VlmCaptioner
    from raycap.rl.algorithm import reinforce_loss
    from raycap.runtime.weights import flat_weights

    torch.manual_seed(0)
    policy = VlmCaptioner.from_pretrained(path, max_new_tokens=new_tokens)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if variant == "lora":
        policy.add_lora(r=r, alpha=2 * r, seed=0)
    policy.set_trainable(True)
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trained, lr=1e-4)  # as the learner's (raycap.roles.optimizer)
    g = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (96, 128, 3), generator=g, dtype=torch.uint8).numpy())
                for _ in range(images)]
    cfg = load_config("world-demo", [f"rl.sampling.num_samples={samples}"])
    rows = policy.pixels(pictures)
    start = time.perf_counter()
    with torch.no_grad():
        caps = policy.generate(rows, "sample", generator=torch.Generator().manual_seed(1), num_samples=samples)
    rollout_s = time.perf_counter() - start
    advantages = torch.randn(caps.tokens.shape[0], generator=g)
    start = time.perf_counter()
    loss, _ = reinforce_loss(policy, reference, rows, caps.tokens, caps.lengths, advantages, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    update_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"variant": variant, "parameters": sum(p.numel() for p in policy.parameters()),
            "trained": sum(p.numel() for p in trained), "rollout_s": rollout_s, "update_s": update_s,
            "peak_rss_gb": peak / 1e9, "sync_mb": flat_weights(policy).nbytes / 1e6,
            "caption_tokens": int(caps.lengths.sum()), "loss_finite": bool(torch.isfinite(loss))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_update(Path(args.child[0]), args.child[1], args.images, args.samples, args.new_tokens,
                                    args.r)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "smolvlm-256m")
        results = {}
        for variant in ("lora", "full"):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), variant, "--images",
                                  str(args.images), "--samples", str(args.samples), "--new-tokens",
                                  str(args.new_tokens), "--r", str(args.r), "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{variant}: exit {out.returncode}\n{out.stderr[-2000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    lora, full = results["lora"], results["full"]
    print(f"SmolVLM-256M-sized, random weights, {lora['parameters'] / 1e6:.0f}M parameters (LoRA r={args.r} adds "
          f"{(lora['parameters'] - full['parameters']) / 1e6:.2f}M); {args.images} images x {args.samples} samples, "
          f"up to {args.new_tokens} new tokens, {args.threads} threads")
    print("| variant | trained | rollout s | update s | peak memory GB | sync MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in (lora, full):
        print(f"| {r['variant']} | {r['trained'] / 1e6:.2f}M | {r['rollout_s']:.1f} | {r['update_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {r['sync_mb']:.1f} |")
    print(f"full / LoRA: update s {full['update_s'] / lora['update_s']:.2f}, peak memory "
          f"{full['peak_rss_gb'] / lora['peak_rss_gb']:.2f}, sync bytes {full['sync_mb'] / lora['sync_mb']:.0f}")
    if not (lora["loss_finite"] and full["loss_finite"]):
        sys.exit("a loss was not finite")


if __name__ == "__main__":
    main()
