"""Memory planning (`raycap.memory`): the learner's floor (weights of the policy and its KL reference, gradients and
AdamW moments of what trains) counted from a captioner's config files on the meta device equals what the loaded
captioner holds, and a run that cannot fit is refused in one line before anything is written: Qwen2-VL-2B fully
fine-tuned on a 24 GB GPU is, with LoRA adapters it is not."""
from __future__ import annotations

import json

import pytest
import torch

from raycap.config import WORLD_DIR, load_config
from raycap.memory import check_learner_fits, estimate, learner_estimate

QWEN2_VL_2B = {  # Qwen/Qwen2-VL-2B-Instruct's config.json, the sizes that count
    "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], "tie_word_embeddings": True,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "text_config": {"model_type": "qwen2_vl_text", "hidden_size": 1536, "intermediate_size": 8960,
                    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                    "vocab_size": 151936, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
}


def qwen2_vl_2b_dir(tmp_path):
    """A raycap VLM captioner directory of Qwen2-VL-2B's shape: its config files, no weights."""
    d = tmp_path / "qwen2-vl-2b"
    (d / "vlm").mkdir(parents=True)
    (d / "vlm" / "config.json").write_text(json.dumps(QWEN2_VL_2B))
    (d / "raycap_vlm.json").write_text(json.dumps({"kind": "vlm", "prompt": "Describe the image.", "image_size": 448,
                                                   "train_projector": False, "lora": None}))
    return d


def test_qwen2_vl_2b_full_fine_tuning_on_a_24_gb_gpu_is_refused_in_one_line(tmp_path, capsys):
    from raycap.train import main as train_main

    cap = qwen2_vl_2b_dir(tmp_path)
    est = learner_estimate(load_config("world-demo", [f"captioner.path={cap}"]))
    assert 2.1e9 < est.parameters < 2.3e9 and est.reference == est.parameters  # Qwen2-VL-2B: 2.2B
    assert 1.4e9 < est.trainable < 1.6e9  # its language model (1.5B, the head tied to the embeddings)
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(out), "--set", f"captioner.path={cap}",
                    "--set", "runtime.gpus_per_learner=1", "--set", "runtime.gpu_memory_gb=24"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "needs at least" in err and "a 24 GB GPU" in err and "captioner.lora.r" in err and "zero_stage" in err
    assert not out.exists()  # nothing written, nothing loaded

    lora = load_config("world-demo", [f"captioner.path={cap}", "captioner.lora.r=16", "runtime.gpus_per_learner=1",
                                      "runtime.gpu_memory_gb=24"])
    fits = check_learner_fits(lora, "ray")
    assert fits.total_bytes < 24e9 < est.total_bytes
    assert fits.trainable < 0.01 * fits.parameters  # the adapters only
    zero = load_config("world-demo", [f"captioner.path={cap}", "runtime.learner_workers=4", "runtime.zero_stage=2"])
    assert learner_estimate(zero, "ray").optimizer_bytes == est.optimizer_bytes // 4
    assert learner_estimate(zero, "local").optimizer_bytes == est.optimizer_bytes  # one learner, no DeepSpeed


def test_a_cpu_learner_is_checked_against_this_machines_memory_and_an_unbuildable_dir_is_left_to_its_loader(
        tmp_path, monkeypatch, capsys):
    """The reference loop on the CPU: the estimate against this machine's memory, in one line; a captioner dir whose
    config transformers cannot build is not refused by the plan but by its loader, in its own line."""
    import raycap.inputs
    from raycap.train import main as train_main

    monkeypatch.setattr(raycap.inputs, "machine_memory_bytes", lambda: 24 * 10**9)
    cap = qwen2_vl_2b_dir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(tmp_path / "run"), "--runtime", "local",
                    "--set", f"captioner.path={cap}", "--set", "runtime.device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "this machine's 24 GB" in err, err
    assert "zero_stage" not in err  # the reference loop has one learner
    (cap / "vlm" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    cfg = load_config("world-demo", [f"captioner.path={cap}"])
    assert learner_estimate(cfg) is None and check_learner_fits(cfg, "local") is None


def counts(cap) -> tuple[int, int]:
    return (sum(p.numel() for p in cap.parameters()),
            sum(p.numel() for p in cap.parameters() if p.requires_grad))


@pytest.mark.parametrize("sets,frozen_dir", [([], False), (["rl.optimiser.train_lm=false"], False),
                                             (["captioner.lora.r=4"], False), ([], True)],
                         ids=["whole", "mapper", "lora", "frozen-lm-dir"])
def test_the_estimate_counts_what_the_world_captioners_learner_holds(sets, frozen_dir, tmp_path):
    """ClipCap (the shipped world captioner, or saved with its LM frozen): the meta-device count equals the roles'
    policy and reference as built for the run, parameters and trained parameters alike."""
    from raycap.models.clipcap import ClipCap
    from raycap.roles import build_role_models

    path = WORLD_DIR / "captioner"
    if frozen_dir:
        import shutil

        ClipCap.from_pretrained(path, train_lm=False).save_pretrained(tmp_path / "frozen")
        shutil.copytree(path / "tokenizer", tmp_path / "frozen" / "tokenizer")
        path = tmp_path / "frozen"
    cfg = load_config("world-demo", [f"captioner.path={path}", *sets])
    est = learner_estimate(cfg)
    models = build_role_models(cfg, torch.device("cpu"), reference=True)
    assert (est.parameters, est.trainable) == counts(models.policy)
    assert est.reference == counts(models.reference)[0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_the_estimate_counts_a_vlm_with_its_adapters_and_projector(family, tmp_path_factory):
    """A VLM built from its config on the meta device counts as the loaded captioner: every parameter; the
    language model and its untied head, with the projector, trained without adapters; the adapters and the
    projector with them (which the reference, loaded before the run's adapters, lacks)."""
    from test_vlm import saved_base

    from raycap.memory import vlm_parts
    from raycap.models.vlm import VlmCaptioner

    base = saved_base(family, str(tmp_path_factory.getbasetemp() / "vlm_bases"))
    cap = VlmCaptioner.from_pretrained(base, train_projector=True)
    parts = vlm_parts(f"{base}/vlm", train_projector=True)
    total, trained = counts(cap.model)
    whole = estimate(parts)
    assert (whole.parameters, whole.trainable) == (total, trained)
    cap.add_lora(r=4, alpha=8, seed=0)
    est = estimate(parts, {"r": 4, "target_modules": None})
    assert (est.parameters, est.trainable) == counts(cap.model) and est.reference == total
    saved = tmp_path_factory.mktemp("saved") / family  # a directory with its own adapters: the plan reads them
    cap.save_pretrained(saved)
    cfg = load_config("world-demo", [f"captioner.path={saved}"])
    assert (learner_estimate(cfg).parameters, learner_estimate(cfg).reference) == (counts(cap.model)[0],) * 2


def test_a_vlm_supervised_stage_that_cannot_fit_is_refused_before_it_writes(tmp_path, monkeypatch, capsys):
    """`raycap pretrain captioner` of kind vlm: Qwen2-VL-2B's whole language model trained on a 24 GB machine is
    refused in one line from its config alone (no KL reference in this stage); with adapters it fits."""
    import raycap.inputs
    from raycap.pretrain import main as pretrain_main

    monkeypatch.setattr(raycap.inputs, "machine_memory_bytes", lambda: 24 * 10**9)
    vlm = qwen2_vl_2b_dir(tmp_path) / "vlm"
    stage = {"device": "cpu", "data": {"kind": "world"}, "retriever": {},
             "model": {"kind": "vlm", "vlm": str(vlm), "lora_r": 0}}
    (tmp_path / "stage.yaml").write_text(json.dumps(stage))
    out = tmp_path / "sup"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain_main(["captioner", "--config", str(tmp_path / "stage.yaml"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "the supervised stage needs at least 27.4 GB" in err and "this machine's 24 GB" in err
    assert "model.lora_r" in err and "KL reference" not in err and not out.exists()
    from raycap.memory import check_stage_fits
    from raycap.supervised.captioner_stage import CaptionerModelConfig

    fits = check_stage_fits(CaptionerModelConfig(kind="vlm", vlm=str(vlm), lora_r=16), "cpu")
    assert fits.total_bytes < 24e9 and fits.reference == 0 and fits.trainable < 0.01 * fits.parameters


def test_a_search_whose_learner_cannot_fit_is_refused_before_it_writes(tmp_path, capsys):
    from raycap.tune import main as tune_main

    cap = qwen2_vl_2b_dir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tune_main(["--space", "discritune", "--config", "world-demo", "--out", str(tmp_path / "search"),
                   "--set", f"captioner.path={cap}", "--set", "runtime.gpus_per_learner=1",
                   "--set", "runtime.gpu_memory_gb=24"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "needs at least 36.2 GB" in err, err
    assert not (tmp_path / "search").exists()
