"""The paper configs (coco-clipcap, cc-clipcap, coco-blip) load with the papers' settings and, without their
weights or data on the machine, fail at once with one line that names what is missing and where it goes; the
converters turn a public ClipCap checkpoint layout and a BLIP directory into raycap captioner dirs."""
import sys
from pathlib import Path

import pytest
import torch

from raycap.config import load_config
from raycap.train import main as train_main

PAPER = ("coco-clipcap", "cc-clipcap", "coco-blip")


@pytest.mark.parametrize("name", PAPER)
def test_paper_settings(name):
    cfg = load_config(name)
    rl = cfg.rl
    assert (rl.optimiser.lr, rl.batch_size, rl.reward.num_candidates, rl.sampling.max_new_tokens,
            rl.algorithm.baseline) == (1e-7, 100, 100, 40, "mean")
    assert (rl.reward.kind, cfg.eval.decoding, cfg.eval.num_beams) == ("discriminative", "beam", 5)
    assert (cfg.retriever.name, cfg.retriever.pretrained) == ("ViT-B-32", "openai")
    assert cfg.setup and "python -m raycap.convert" in cfg.setup


def test_a_learner_on_a_gpu_gives_the_reward_service_one_and_one_gpu_configs_fit_one():
    """Scoring and the evaluations (5,000 images, beam 5 in the paper configs) run in the reward service: a config
    that gives its learner a GPU gives the reward service one too, and a config built for one GPU fits on one
    (Ray's fractional GPUs). world-gpu, a 4-GPU cluster layout whose reward service scores the world's
    embeddings, keeps it on the CPU: a GPU of its own would need a fifth (benchmarks/gpu_check.sh runs it on 4 or 1)."""
    from raycap.config import CONFIG_DIR, named_configs
    from raycap.runtime.resources import Roles, check_local_gpus

    one_gpu = []
    for name in named_configs():
        rt = load_config(name).runtime
        if rt.gpus_per_learner and name != "world-gpu":
            assert rt.gpus_per_reward > 0, name
        if "Built for one GPU" in (CONFIG_DIR / f"{name}.yaml").read_text():
            assert sum(b.get("GPU", 0) for b in Roles.of(rt).bundles(rt)) <= 1, name
            check_local_gpus(rt, visible=1)
            one_gpu.append(name)
    assert sorted(one_gpu) == sorted(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_missing_inputs_fail_at_once_naming_what_and_where(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ and no captioners/ here
    with pytest.raises(SystemExit) as e:
        train_main(["--config", name, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "data.path data/" in err and "no such file or directory" in err and "python -m raycap.convert" in err
    assert not (tmp_path / "run").exists()  # nothing written, no Ray started


def test_convert_a_public_clipcap_layout_and_a_blip_dir(tmp_path, tiny_world_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raycap.convert import main as convert_main
    from raycap.inputs import load_captioner
    from raycap.models.bpe import train_bpe

    tok = train_bpe(["a red circle", "a blue square at top"], vocab_size=300)
    tok.save_pretrained(str(tmp_path / "tok"))
    lm = {"vocab_size": len(tok), "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64}
    (tmp_path / "lm").mkdir()
    GPT2Config(**lm).save_pretrained(tmp_path / "lm")
    gpt = GPT2LMHeadModel(GPT2Config(**lm))
    sd = {f"gpt.{k}": v for k, v in gpt.state_dict().items()}
    sd |= {"clip_project.model.0.weight": torch.randn(320, 512), "clip_project.model.0.bias": torch.randn(320),
           "clip_project.model.2.weight": torch.randn(640, 320), "clip_project.model.2.bias": torch.randn(640)}
    torch.save(sd, tmp_path / "coco_weights.pt")
    out = convert_main(["clipcap", str(tmp_path / "coco_weights.pt"), "--tokenizer", str(tmp_path / "tok"),
                        "--lm", str(tmp_path / "lm"), "--out", str(tmp_path / "clipcap")])
    captioner, back = load_captioner(out)
    assert captioner.config.prefix_length == 10 and len(back) == len(tok)
    assert torch.equal(captioner.mapper.model[0].weight, sd["clip_project.model.0.weight"])

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from make_tiny_blip import save_tiny_blip

    blip_dir = save_tiny_blip(tmp_path / "blip", tiny_world_dir / "retriever" / "tokenizer")
    captioner, back = load_captioner(convert_main(["blip", str(blip_dir), "--out", str(tmp_path / "blip-c")]))
    assert type(captioner).__name__ == "BlipCaptioner" and back.bos_token == "[DEC]"
    with pytest.raises(SystemExit) as e:
        convert_main(["clipcap", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_the_test_split_decodes_as_eval_decoding_says(tiny_world_dir, tmp_path):
    from raycap.local_trainer import LocalTrainer
    from raycap.supervised.captioner import caption_embeddings
    from world_runs import world_sets

    cfg = load_config("world-demo", [*world_sets(tiny_world_dir), "eval.images=100", "eval.decoding=beam",
                                     "eval.num_beams=3", "rl.sampling.max_new_tokens=8", "threads=2"])
    trainer = LocalTrainer(cfg, tmp_path / "run", log=lambda *_: None)
    s = trainer.splits["test"]
    beam = caption_embeddings(trainer.policy, trainer.tokenizer, s.embeddings[:3], "beam", 3)
    greedy = caption_embeddings(trainer.policy, trainer.tokenizer, trainer.splits["val"].embeddings[:3], "greedy")
    assert [e["caption"] for e in trainer.evaluate("test")["examples"]] == beam
    assert [e["caption"] for e in trainer.evaluate("val")["examples"]] == greedy
