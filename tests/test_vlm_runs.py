"""A vision-language model as the captioner of a DiscriTune run: a tiny random model of each family (LLaVA,
SmolVLM / Idefics3, Qwen2-VL, PaliGemma; built in test_vlm.py) with LoRA adapters runs 2 updates on the tiny world on
the reference loop and on Ray, reading its pixel rows (cached, or per batch on Ray) and rewarded by the frozen world
retriever through the captions' text. The run moves its adapters and nothing of the image side, ends with a
captioner directory the registry loads and whose merged export `AutoModelForImageTextToText` loads; `raycap
evaluate` and `raycap caption` read that directory."""
from __future__ import annotations

import json

import pytest
import torch
from test_vlm import saved_base
from world_runs import FAST, world_sets

from raycap.models import lora
from raycap.models.vlm import VlmCaptioner

FAMILIES = ["llava", "smolvlm", "qwen2_vl", "paligemma"]
RAY_IN_CI = {"llava"}  # the others on Ray are `slow`: the reference loop runs every family in CI, and the
# Ray-only part (pixel rows through the object store to each role) is the same for every family


def lora_captioner(family: str, root) -> tuple[VlmCaptioner, object]:
    base = saved_base(family, str(root / "vlm_bases"))
    cap = VlmCaptioner.from_pretrained(base)
    cap.add_lora(r=4, alpha=8, seed=0)
    out = root / f"vlm-lora-{family}"
    if not out.exists():
        cap.save_pretrained(out)
    return cap, out


def run_two_updates(tiny_world_dir, captioner_dir, out, runtime, *extra):
    from raycap.ray_start import free_port
    from raycap.train import main as train_main

    sets = [a for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path") for a in ("--set", s)]
    return train_main(["--config", "world-demo", "--out", str(out), "--runtime", runtime, *sets,
                       "--set", f"captioner.path={captioner_dir}", "--set", "rl.steps=2", *FAST,
                       "--set", "eval.every=2", "--set", f"runtime.dashboard_port={free_port()}", *extra])


def check_run(cap: VlmCaptioner, out, tmp_path, updates=None):
    from transformers import AutoModelForImageTextToText

    from raycap.models.loading import load_captioner_model

    if updates is None:  # DiscriTune
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        updates = [r for r in records if "reward_mean" in r]
        assert [r["step"] for r in updates] == [1, 2]
        # the banned image tokens' floor keeps the full KL in the loss, and the entropy, finite
        assert all(torch.isfinite(torch.tensor([r["loss"], r["kl"], r["entropy"]])).all() for r in updates)
    final = load_captioner_model(out / "final")
    assert type(final) is VlmCaptioner and lora.has_lora(final.lora_target)
    before, after = cap.model.state_dict(), final.model.state_dict()
    frozen = set(cap.frozen_parameters())
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # the image side never moves
    moved = {n for n in after if lora.LORA_MARK in n and not torch.equal(before[n], after[n])}
    assert moved  # the adapters learned
    final.merge_and_save(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(merged) is type(cap.model) and not lora.has_lora(merged)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_discritune_updates_on_the_reference_loop(family, tiny_world_dir, tmp_path, tmp_path_factory):
    cap, captioner_dir = lora_captioner(family, tmp_path_factory.getbasetemp())
    final = run_two_updates(tiny_world_dir, captioner_dir, tmp_path / "rl", "local")
    assert final["updates"] == 2
    check_run(cap, tmp_path / "rl", tmp_path)


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in RAY_IN_CI else [pytest.mark.slow])
                                    for f in FAMILIES])
def test_two_discritune_updates_on_ray_with_pixel_rows_per_batch(family, tiny_world_dir, tmp_path, tmp_path_factory):
    """On Ray the rollout workers and the learner read each batch's pixel rows (`ImageRows` through the object
    store), as a VLM whose cached rows would not fit does."""
    cap, captioner_dir = lora_captioner(family, tmp_path_factory.getbasetemp())
    final = run_two_updates(tiny_world_dir, captioner_dir, tmp_path / "rl", "ray",
                            "--set", "captioner.vision_features=per_batch")
    assert final["updates"] == 2
    check_run(cap, tmp_path / "rl", tmp_path)


def test_evaluate_and_caption_read_a_vlm_run(tiny_world_dir, tmp_path, tmp_path_factory, capsys):
    from PIL import Image

    from raycap.caption import main as caption_main
    from raycap.data.world import World, WorldConfig
    from raycap.evaluate import main as evaluate_main

    _, captioner_dir = lora_captioner("llava", tmp_path_factory.getbasetemp())
    metrics = evaluate_main(["--captioner", str(captioner_dir), "--dataset", "world:test", "--world-dir",
                             str(tiny_world_dir), "--images", "100", "--hard-distractors", "--json",
                             str(tmp_path / "m.json")])
    assert 0.0 <= metrics["p_at_1"] <= 1.0 and json.loads((tmp_path / "m.json").read_text())["p_at_1"] == \
        metrics["p_at_1"]
    world = World(WorldConfig())
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(world.image("test", i)).save(files[-1])
    capsys.readouterr()
    caption_main([*map(str, files), "--captioner", str(captioner_dir), "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(f) for f in files]
    assert all(isinstance(r["caption"], str) for r in results)


def test_the_supervised_stage_trains_adapters_on_references_and_rl_starts_from_it(tiny_world_dir, tmp_path,
                                                                                  tmp_path_factory):
    """`raycap pretrain captioner` with `model.kind: vlm`: an HF VLM directory gets LoRA adapters on its language
    model, learns the references with cross-entropy (its validation loss falls), keeps its vision tower, and the
    saved captioner is what a DiscriTune run starts from."""
    from raycap.models.loading import load_captioner_model
    from raycap.pretrain import main as pretrain_main

    base = saved_base("llava", str(tmp_path_factory.getbasetemp() / "vlm_bases"))
    start = VlmCaptioner.from_pretrained(base)
    cfg = {"seed": 0, "threads": 2, "data": {"kind": "world", "path": str(tiny_world_dir)},
           "retriever": {"path": str(tiny_world_dir / "retriever")},
           "model": {"kind": "vlm", "vlm": f"{base}/vlm", "prompt": "A picture of", "lora_r": 4, "lora_alpha": 8},
           "training": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "max_new_tokens": 8,
                        "val_images": 50},
           "eval_images": 100}
    (tmp_path / "stage.yaml").write_text(json.dumps(cfg))
    metrics = pretrain_main(["captioner", "--config", str(tmp_path / "stage.yaml"), "--out", str(tmp_path / "sup")])
    assert "p_at_1" in metrics
    log = [json.loads(line) for line in (tmp_path / "sup" / "work" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    trained = load_captioner_model(tmp_path / "sup" / "captioner")
    assert type(trained) is VlmCaptioner and lora.has_lora(trained.lora_target)
    before, after = start.model.state_dict(), trained.model.state_dict()
    ids = {id(p) for p in trained.projector.parameters()}
    projector = [n for n, p in trained.model.named_parameters() if id(p) in ids]
    assert projector and all(torch.equal(before[n], after[n]) for n in projector)  # train_projector: false
    assert all(torch.equal(before[n], after[n]) for n in start.frozen_parameters())
    assert any(lora.LORA_MARK in n and not torch.equal(after[n], torch.zeros_like(after[n])) and "lora_B" in n
               for n in after)  # the adapters learned (lora_B starts at zero)
    final = run_two_updates(tiny_world_dir, tmp_path / "sup" / "captioner", tmp_path / "rl", "local")
    assert final["updates"] == 2


@pytest.mark.parametrize("name", ["smolvlm2-coco-stage", "qwen2vl-coco-stage"])
def test_the_vlm_example_configs_load(name):
    """The COCO example stages for SmolVLM2 and Qwen2-VL (not run here: no weights or COCO) are valid configs."""
    from pathlib import Path

    from raycap.supervised.captioner_stage import load_stage_config

    cfg = load_stage_config(Path(__file__).parents[1] / "examples" / f"{name}.yaml")
    assert cfg.model.kind == "vlm" and cfg.model.lora_r == 16 and cfg.model.image_size
    assert cfg.data.kind == "karpathy"


def test_the_second_method_runs_gumbel_through_a_vlm(tiny_world_dir, tmp_path, tmp_path_factory):
    """`world-relevance` (straight-through Gumbel captions into the frozen retriever's text tower) with a LLaVA:
    2 updates on the reference loop move the adapters and nothing of the image side, with finite losses; the run's
    report builds from its directory."""
    cap, captioner_dir = lora_captioner("llava", tmp_path_factory.getbasetemp())
    from raycap.train import main as train_main

    sets = [a for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path") for a in ("--set", s)]
    final = train_main(["--config", "world-relevance", "--out", str(tmp_path / "rl"), "--runtime", "local", *sets,
                        "--set", f"captioner.path={captioner_dir}", "--set", "rl.steps=2", *FAST,
                        "--set", "eval.every=2"])
    assert final["updates"] == 2
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "clip_cos" in r]
    assert [r["step"] for r in updates] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl"], r["clip_cos"]])).all() for r in updates)
    check_run(cap, tmp_path / "rl", tmp_path, updates=updates)
    from raycap.report.__main__ import main as report_main

    page = report_main([str(tmp_path / "rl"), "--gallery", "2", "--out", str(tmp_path / "report")])
    html = page.read_text()
    assert 'src="images/test-0.png"' in html and 'src="images/test-1.png"' in html  # the gallery: 2 test images
    assert html.count('class="card"') == 2 and html.count('class="caption"') >= 4  # each with its captions


def test_a_resumed_vlm_run_equals_an_uninterrupted_one(tiny_world_dir, tmp_path, tmp_path_factory):
    """A LLaVA run with LoRA cut after step 3 (its step-2 checkpoint kept) and resumed logs and ends as the run
    that was never cut: the adapters' and the optimizer's state come back from the checkpoint."""
    from test_resume import assert_same_weights, interrupt

    _, captioner_dir = lora_captioner("llava", tmp_path_factory.getbasetemp())
    # one dashboard port for both (run_two_updates picks a free one): a resume refuses a changed config
    args = ("--set", "rl.steps=4", "--set", "checkpoint_every=2", "--set", "runtime.dashboard_port=8265")
    whole = run_two_updates(tiny_world_dir, captioner_dir, tmp_path / "whole", "local", *args)
    interrupt(tmp_path / "whole", tmp_path / "resumed")
    resumed = run_two_updates(tiny_world_dir, captioner_dir, tmp_path / "resumed", "local", *args)
    assert resumed["updates"] == 2 and whole["p_at_1"] == resumed["p_at_1"]
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "resumed"))
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for key in ("reward_mean", "kl", "loss"):
        assert [r[key] for r in a[3:]] == [r[key] for r in b[3:]], key
    assert_same_weights(tmp_path / "whole" / "final", tmp_path / "resumed" / "final")


def test_a_llava_sees_through_the_world_retrievers_image_tower(tiny_world_dir, tmp_path):
    """`examples/make_tiny_llava.py`: the retriever's open_clip tower copied into HF's CLIPVisionModel is exact (its
    pooled class token times the retriever's projection is the retriever's image embedding; the hidden states LLaVA
    reads are `encode_image_tokens`), and the saved LLaVA loads as a raycap captioner whose pixel rows are the
    retriever's pixels."""
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from make_tiny_llava import save_llava_on_retriever

    from raycap.data.world import World, WorldConfig
    from raycap.models.clip import Retriever
    from raycap.models.clip_vision import clip_vision_from_open_clip

    retriever = Retriever.from_pretrained(tiny_world_dir / "retriever").eval()
    world = World(WorldConfig.parse(json.loads((tiny_world_dir / "world.json").read_text()), str(tiny_world_dir)))
    images = world.images("val", range(4))
    pixels = retriever.pixels(images)
    tower = clip_vision_from_open_clip(retriever.model.visual).eval()
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(out.pooler_output @ retriever.model.visual.proj,
                                   retriever.encode_image(pixels, normalize=False), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.hidden_states[-2], retriever.encode_image_tokens(pixels), atol=1e-5, rtol=1e-5)

    save_llava_on_retriever(tmp_path / "llava", tiny_world_dir / "retriever", width=32, layers=1)
    cap = VlmCaptioner.from_hf(str(tmp_path / "llava"), image_size=retriever.image_size)
    rows = cap.pixels([Image.fromarray(np.asarray(i)) for i in images])
    torch.testing.assert_close(rows, pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        seen = cap.model.model.vision_tower(pixel_values=rows, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(seen, retriever.encode_image_tokens(pixels), atol=1e-5, rtol=1e-5)
    assert cap._start(rows).shape == (4, *retriever.token_shape[:1], 32)  # every token, class token included
    tok = cap.hf_processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") in cap.placeholder_ids and cap.stop_ids == [tok.eos_token_id]


@pytest.mark.parametrize("config", ["world-demo", "world-relevance"], ids=["discritune", "gumbel"])
def test_both_methods_on_a_vlm_under_bf16_autocast(config, tiny_world_dir, tmp_path, tmp_path_factory):
    """The precision a GPU role runs in, on the CPU: a LLaVA with LoRA under bf16 autocast decodes, scores and
    updates (DiscriTune's sampled rollouts and teacher forcing; Gumbel's soft tokens through the model), keeping its
    weights fp32, its losses finite and its image side still."""
    from raycap.config import load_config
    from raycap.local_trainer import LocalTrainer

    _, captioner_dir = lora_captioner("llava", tmp_path_factory.getbasetemp())
    sets = [s for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path")]
    cfg = load_config(config, [*sets, f"captioner.path={captioner_dir}", "runtime.precision=bf16",
                               "runtime.device=cpu", "rl.steps=2", "rl.batch_size=8", "rl.reward.num_candidates=8",
                               "rl.sampling.max_new_tokens=6", "eval.images=100", "eval.every=100",
                               "eval.report=false", "eval.test_table=false", "threads=2"])
    trainer = LocalTrainer(cfg, tmp_path / "run", log=lambda *a: None)
    assert trainer.models.dtype == torch.bfloat16
    policy = trainer.policy
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    for step in (0, 1):
        stats = trainer.update(step)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float)), stats
    assert ("clip_cos" in stats) == (config == "world-relevance")
    after = dict(policy.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())  # fp32 weights under bf16 autocast
    assert all(torch.equal(before[n], after[n]) for n in policy.frozen_parameters())  # the image side
    assert any(lora.LORA_MARK in n and not torch.equal(before[n], p) for n, p in after.items())  # the adapters
    if config == "world-demo":
        from raycap.rl import algorithm

        _, img, _ = trainer.scorer.batch(1)
        with trainer.models.autocast():
            caps = algorithm.rollout(policy, img, cfg, 1)
            logits = policy.logits(img, caps.tokens)
        assert caps.logprobs.dtype == logits.dtype == torch.float32 and torch.isfinite(logits).all()
