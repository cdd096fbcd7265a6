"""Paper-scale cost of one DiscriTune update and of the final evaluation, random weights, nothing downloaded:
CLIP ViT-B/32 (open_clip, `pretrained=None`) as the retriever, ClipCap (MLP mapper, prefix 10) over GPT-2 124M
(`GPT2Config()`), batch 100, 40 new tokens per caption (no stop token: every caption is 40 tokens long).

In one run, on the same weights and the same batch:
- raycap's update: the pool's image embeddings cached once (untimed), then `Scorer.batch` -> `rollout` (sampled,
  KV cache; `rollout_decoder`: the static cache + CUDA graph on CUDA) -> `Scorer.score` -> `Advantages` ->
  `reinforce_backward` (REINFORCE + KL guard, `rl.optimiser.micro_batch` images per teacher-forced pass), those in
  the run's precision (`runtime.precision`, auto: bf16 autocast on CUDA, fp32 on a CPU) -> backward ->
  clip_grad_norm_ 1.0
  -> raycap's Adam (`raycap.roles.optimizer`: fused on CUDA), exactly `LocalTrainer.update`'s sequence;
- the ClipCap/EGG-style update: the batch's pixels re-encoded by the CLIP image tower every step, the captions
  decoded by re-running the whole sequence for every token (`use_cache=False`), the captions re-tokenized to
  CLIP's full 77-token context and scored, the same REINFORCE + KL loss, backward, plain torch Adam (its own
  state, same parameters); fp32 throughout;
- the evaluation: beam 5 captions of `--eval-images` (1,000) random image embeddings
  (`raycap.supervised.captioner.caption_embeddings`), in the run's precision as `LocalTrainer.evaluate`.
Each variant runs once untimed first, at exactly the timed shape (`--batch` images x `--samples` captions,
`--tokens` tokens: the static decoder captures its CUDA graph on the first call of each (rows, length) shape, so
a warm-up at another shape would leave the capture inside the first timed update; it also allocates Adam's state
and warms the kernels and the allocator), then `--repeats` times timed (the median is printed); the evaluation is
warmed on one decode batch of its own size (`--eval-batch-size` sequences). `--warmup tiny` warms at 2 images x 2
tokens instead (the old, cheaper warm-up, for CPU runs, where nothing is captured). Progress goes to stderr; stdout
gets one header line with the sizes, then exactly

    raycap_update_s: X
    egg_update_s: Y
    ratio: Y/X
    eval_1000_beam5_s: Z     (the key names the evaluation's real size: --eval-images, --beams)
    peak_rss_gb: W           (this process's peak resident set, GiB: getrusage ru_maxrss, children not counted)
    raycap_peak_rss_gb: V    (the same, read after raycap's first timed update, before the EGG-style loop runs)
    raycap_warmup_s: A       (the untimed warm-up update: on CUDA it includes the CUDA graph captures)
    egg_warmup_s: B
    eval_warmup_s: C         (nan with --skip-eval)

    python benchmarks/paper_scale.py                    # the paper's sizes on the CPU (minutes on 2 cores)
    python benchmarks/paper_scale.py --device cuda      # the same on a GPU (timers read after cuda synchronize)
    python benchmarks/paper_scale.py --batch 4 --tokens 4 --eval-images 8 --samples 2   # a smoke test
    python benchmarks/paper_scale.py --warmup tiny      # the CPU run with the cheap 2 x 2 warm-up

The captioner's tokenizer is a byte-level BPE (`raycap.models.bpe.train_bpe`) trained here on synthetic text to
GPT-2's 50,257 ids, so every id the random LM samples decodes to real text (HF tokenizers drop ids beyond their
vocabulary: a small BPE would turn most random captions into empty strings and make scoring look free).
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads: random weights, a locally trained BPE

import numpy as np
import open_clip
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.config import load_config
from raycap.models.bpe import train_bpe
from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.models.decode import rollout_decoder
from raycap.models.precision import autocast, compute_dtype
from raycap.models.tokenizers import decode
from raycap.rl import algorithm, rewards
from raycap.roles import optimizer
from raycap.supervised.captioner import EVAL_BATCH, caption_embeddings

CONFIG = "coco-clipcap"  # the paper's DiscriTune settings (reward, baseline, KL guard, lr, sampling)
CLIP_NAME = "ViT-B-32"
CLIP_CONTEXT = 77  # what ClipCap/EGG tokenizes every caption to (open_clip's tokenizer default)
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    """This process's peak resident set so far, GiB (getrusage ru_maxrss: KiB on Linux; children not counted)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def synthetic_bpe(vocab_size: int, seed: int):
    """A byte-level BPE with exactly `vocab_size` ids, trained on sentences of random letter words (enough
    distinct words that the merges reach GPT-2's vocabulary; about 2 s)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(20000)]
    tok = train_bpe((" ".join(rng.choice(words, size=12)) for _ in range(20000)), vocab_size=vocab_size)
    if len(tok) != vocab_size:
        raise RuntimeError(f"the synthetic BPE reached {len(tok)} ids, not the LM's {vocab_size}")
    return tok


def run_config(args, batch: int, tokens: int):
    """The coco-clipcap config at this benchmark's sizes (its data/retriever/captioner paths are never opened)."""
    sets = [f"rl.batch_size={batch}", f"rl.reward.num_candidates={batch}", f"rl.sampling.max_new_tokens={tokens}",
            f"seed={args.seed}", f"threads={args.threads}"]
    if args.samples is not None:
        sets.append(f"rl.sampling.num_samples={args.samples}")
    if args.precision is not None:
        sets.append(f"runtime.precision={args.precision}")
    if args.micro_batch is not None:
        sets.append(f"rl.optimiser.micro_batch={min(args.micro_batch, batch) or 'null'}")
    cfg = load_config(CONFIG, sets)
    if cfg.rl.method != "discritune" or cfg.rl.reward.hard_distractors:
        raise SystemExit(f"{CONFIG}: this benchmark times DiscriTune with in-batch distractors")
    return cfg


class Bench:
    def __init__(self, args):
        self.args, self.dev = args, torch.device(args.device)
        torch.manual_seed(args.seed)
        self.cfg = run_config(args, args.batch, args.tokens)
        # the warm-up's config: the timed one (same rows and length: the CUDA graphs captured there are the ones
        # the timed updates replay), or 2 images x 2 tokens with --warmup tiny
        self.warm_cfg = self.cfg if args.warmup == "timed" else run_config(args, 2, 2)

        log(f"building {CLIP_NAME} (random weights), GPT-2 124M + ClipCap, the BPE ...")
        self.retriever = Retriever.from_open_clip(CLIP_NAME, pretrained=None).freeze().to(self.dev)
        lm = GPT2LMHeadModel(GPT2Config(eos_token_id=None, bos_token_id=None))  # no eos: 40 tokens every caption
        self.policy = ClipCap(ClipCapConfig(clip_dim=self.retriever.embed_dim, prefix_length=10, lm={},
                                            max_new_tokens=args.tokens), lm=lm).to(self.dev)
        self.policy.set_trainable(self.cfg.rl.optimiser.train_lm)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.decoder = rollout_decoder(self.policy)  # the rollouts' decoder: static cache + CUDA graph on CUDA
        self.tokenizer = synthetic_bpe(lm.config.vocab_size, args.seed)
        self.clip_tokenize = open_clip.get_tokenizer(CLIP_NAME)
        self.opt = optimizer(self.policy, self.cfg)  # raycap's learner step (fused Adam on CUDA)
        self.egg_opt = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad],
                                        lr=self.cfg.rl.optimiser.lr)
        self.dtype = compute_dtype(self.cfg.runtime.precision, self.dev)  # raycap's forward passes (None: fp32)

        # the image pool: one batch of random images; raycap caches their embeddings once, outside the timing
        S = self.retriever.image_size
        rng = np.random.default_rng(args.seed)
        self.pixels = rng.integers(0, 256, size=(args.batch, S, S, 3), dtype=np.uint8)
        log(f"caching the embeddings of {args.batch} images ...")
        self.embeddings = self.retriever.encode_pixels(self.pixels).to(self.dev)  # as LocalTrainer holds them
        self.eval_emb = torch.nn.functional.normalize(
            torch.randn(args.eval_images, self.retriever.embed_dim, generator=torch.Generator().manual_seed(args.seed)),
            dim=-1)
        self.sizes = (f"lm {millions(self.policy.lm)}, mapper {millions(self.policy.mapper)}, "
                      f"vit {millions(self.retriever.model.visual)} (clip text tower "
                      f"{millions(self.retriever.model.transformer)}), vocab {lm.config.vocab_size}")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def _learner_step(self, opt, loss: torch.Tensor, step: int, clip: bool) -> None:
        algorithm.check_loss(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        opt.step()

    # -- raycap: cached embeddings, KV-cache decode, raycap's learner step (LocalTrainer.update) --------------
    def raycap_update(self, cfg, scorer: algorithm.Scorer, advantages: algorithm.Advantages, step: int) -> None:
        def forward():
            return autocast(self.dev, self.dtype)  # the forward passes; backward and the step outside

        _, img, cands = scorer.batch(step)
        self.opt.zero_grad(set_to_none=True)
        with forward():
            caps = algorithm.rollout(self.policy, img, cfg, step, decoder=self.decoder)
            scores = scorer.score(cands, caps.tokens, caps.lengths, step)
            greedy = None
            if cfg.rl.algorithm.baseline == "greedy":
                g = algorithm.rollout(self.policy, img, cfg, step, greedy=True, decoder=self.decoder)
                greedy = scorer.score(cands, g.tokens, g.lengths, step).reward
        r = scores.reward
        adv = r - advantages.baseline(r, greedy)
        algorithm.reinforce_backward(self.policy, self.reference, img, caps.tokens, caps.lengths, adv, cfg, step,
                                     torch.Tensor.backward, forward)  # over rl.optimiser.micro_batch images at a time
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()

    # -- ClipCap/EGG style: pixels re-encoded, the sequence re-run per token, full-context CLIP text, fp32 -----
    def egg_update(self, cfg, scorer: algorithm.Scorer, advantages: algorithm.Advantages, step: int) -> None:
        idx, _, cands = scorer.batch(step)  # the same images and distractors as raycap's update of this step
        with torch.no_grad():
            img = self.retriever.encode_image(self.retriever.pixels(self.pixels[idx.numpy()])).float()
            # candidates are the batch's own images (hard_distractors 0): pool index -> row of this batch
            row = torch.full((len(self.embeddings),), -1, dtype=torch.long)
            row[idx] = torch.arange(len(idx))
            local = row[cands]
            assert bool((local >= 0).all()), "EGG-style candidates must come from the batch"
            self.policy.eval()
            caps = self.policy.generate(img, mode="sample", temperature=cfg.rl.sampling.temperature,
                                        num_samples=cfg.rl.sampling.num_samples, use_cache=False,
                                        generator=algorithm.generator(cfg.seed, step, algorithm.ROLLOUT))
            texts = decode(self.tokenizer, caps.tokens, caps.lengths, self.policy.stop_ids)
            ids = self.clip_tokenize(texts, CLIP_CONTEXT).to(self.dev)
            text_emb = self.retriever.model.encode_text(ids, normalize=True)
            k = caps.tokens.shape[0] // len(idx)
            r = rewards.compute(cfg.rl.reward.kind, text_emb.float(), img, local.repeat_interleave(k, dim=0),
                                float(self.retriever.logit_scale), batch=step)
        adv = r - advantages.baseline(r)
        loss, _ = algorithm.reinforce_loss(self.policy, self.reference, img, caps.tokens, caps.lengths, adv, cfg)
        self._learner_step(self.egg_opt, loss, step, clip=False)

    def evaluate(self, emb: torch.Tensor) -> None:
        with autocast(self.dev, self.dtype):
            caption_embeddings(self.policy.eval(), self.tokenizer, emb, mode="beam", num_beams=self.args.beams,
                               batch_size=self.args.eval_batch_size)

    def run(self) -> dict:
        args = self.args

        def scorer(cfg):
            return algorithm.Scorer(self.retriever, self.embeddings, self.tokenizer, self.policy.stop_ids, cfg)

        w = self.warm_cfg
        shape = f"{w.rl.batch_size} images x {w.rl.sampling.num_samples} samples, {w.rl.sampling.max_new_tokens} tokens"

        def warm_up(update) -> float:
            # generate reads the captioner's
            self.policy.config.max_new_tokens = w.rl.sampling.max_new_tokens
            # its own step (another batch draw, same shape) and its own baseline state: the timed ones start fresh
            seconds = self.timed(lambda: update(w, scorer(w), algorithm.Advantages(w), 10_000))
            self.policy.config.max_new_tokens = self.cfg.rl.sampling.max_new_tokens  # as LocalTrainer sets it
            return seconds

        log(f"raycap warm-up ({shape}{'; captures the CUDA graphs' if self.dev.type == 'cuda' else ''}) ...")
        self.warmup = {"raycap": warm_up(self.raycap_update), "egg": float("nan"), "eval": float("nan")}
        log(f"raycap warm-up: {self.warmup['raycap']:.2f} s")
        graphs = self.graph_shapes()
        if not args.skip_eval:  # one decode batch of the evaluation's own size (or 2 images with --warmup tiny)
            n = 2 if args.warmup == "tiny" else min(args.eval_images, max(1, args.eval_batch_size // args.beams))
            log(f"evaluation warm-up ({n} images, beam {args.beams}) ...")
            self.warmup["eval"] = self.timed(lambda: self.evaluate(self.eval_emb[:n]))
            log(f"evaluation warm-up: {self.warmup['eval']:.2f} s")
        s = scorer(self.cfg)
        adv_raycap, adv_egg = algorithm.Advantages(self.cfg), algorithm.Advantages(self.cfg)
        times = {"raycap": [], "egg": [], "eval": []}
        for rep in range(args.repeats):  # interleaved; each repeat a new step (a new batch draw)
            times["raycap"].append(self.timed(lambda: self.raycap_update(self.cfg, s, adv_raycap, rep)))
            log(f"raycap update {rep}: {times['raycap'][-1]:.2f} s")
            if rep == 0:  # before the EGG-style loop allocates anything (its own Adam state, its activations)
                self.raycap_peak = peak_rss_gib()
                log(f"EGG-style warm-up ({shape}) ...")
                self.warmup["egg"] = warm_up(self.egg_update)
                log(f"EGG-style warm-up: {self.warmup['egg']:.2f} s")
            times["egg"].append(self.timed(lambda: self.egg_update(self.cfg, s, adv_egg, rep)))
            log(f"EGG-style update {rep}: {times['egg'][-1]:.2f} s")
        if not args.skip_eval:
            for rep in range(args.repeats):
                times["eval"].append(self.timed(lambda: self.evaluate(self.eval_emb)))
                log(f"evaluation {rep}: {times['eval'][-1]:.2f} s")
        new = self.graph_shapes() - graphs
        if new and args.warmup == "timed":  # the warm-up should have captured every shape the updates use
            log(f"warning: the timed updates captured CUDA graphs of new shapes {sorted(map(str, new))}")
        return {k: statistics.median(v) if v else float("nan") for k, v in times.items()}

    def graph_shapes(self) -> set:
        """The keys (rows, cache length, ...) of the steps (and CUDA graphs) the rollouts' static decoder holds;
        empty where the rollouts decode with the captioner's own generate (a CPU)."""
        return set(getattr(self.decoder, "_steps", None) or ())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=100, help="images per update (and distractors per image + 1)")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per caption (updates and evaluation)")
    p.add_argument("--samples", type=int, default=None, help=f"captions sampled per image (default: {CONFIG}'s "
                   "rl.sampling.num_samples)")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH, help="sequences (images x beams) decoded "
                   "at once in the evaluation")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each variant (the median is printed)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help="raycap's update and "
                   f"evaluation (default: {CONFIG}'s runtime.precision); the EGG-style update is always fp32")
    p.add_argument("--micro-batch", type=int, default=None, help=f"images per teacher-forced pass of raycap's "
                   f"update (default: {CONFIG}'s rl.optimiser.micro_batch; 0: the whole batch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--warmup", choices=["timed", "tiny"], default="timed", help="the untimed run before timing: "
                   "at the timed shape (default: captures the CUDA graphs the timed updates replay), or at 2 images "
                   "x 2 tokens (cheaper; for CPU runs, where no graph is captured)")
    args = p.parse_args()
    if args.batch < 2 or args.tokens < 1 or args.eval_images < 1 or args.repeats < 1:
        p.error("--batch >= 2, --tokens, --eval-images and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)

    bench = Bench(args)
    t = bench.run()
    peak_rss = peak_rss_gib()
    device = f"cuda ({torch.cuda.get_device_name()}, peak allocated " \
             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)" if args.device == "cuda" \
        else f"cpu ({args.threads} threads)"
    cfg = bench.cfg
    print(f"sizes: {bench.sizes}; batch {args.batch} x {cfg.rl.sampling.num_samples} samples, {args.tokens} tokens, "
          f"eval {'skipped' if args.skip_eval else f'{args.eval_images} images beam {args.beams}'}; "
          f"raycap precision {cfg.runtime.precision} ({'fp32' if bench.dtype is None else str(bench.dtype)[6:]}), "
          f"EGG fp32; median of {args.repeats} after a warm-up at "
          f"{'the timed shape' if args.warmup == 'timed' else '2 x 2'}; {device}")
    print(f"raycap_update_s: {t['raycap']:.3f}")
    print(f"egg_update_s: {t['egg']:.3f}")
    print(f"ratio: {t['egg'] / t['raycap']:.2f}")
    print(f"eval_{args.eval_images}_beam{args.beams}_s: {t['eval']:.3f}")
    print(f"peak_rss_gb: {peak_rss:.2f}")
    print(f"raycap_peak_rss_gb: {bench.raycap_peak:.2f}")
    print(f"raycap_warmup_s: {bench.warmup['raycap']:.3f}")
    print(f"egg_warmup_s: {bench.warmup['egg']:.3f}")
    print(f"eval_warmup_s: {bench.warmup['eval']:.3f}")


if __name__ == "__main__":
    main()
