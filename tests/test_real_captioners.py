"""ClipCap over real-style language models with their own tokenizers, built and saved locally: a byte-level BPE
trained on the world's references with a tiny GPT-2 and a tiny LLaMA. The supervised stage runs for the four
ClipCap variants (MLP / Transformer mapper x LM frozen / trained), and DiscriTune then trains on them with the
world retriever, whose word-level tokenizer re-reads the decoded text."""
import json

import pytest
import torch

from raycap.models.bpe import train_bpe
from raycap.models.tokenizers import load_tokenizer
from world_runs import world_sets

LMS = {
    "gpt2": lambda v, eos: __import__("transformers").GPT2LMHeadModel(__import__("transformers").GPT2Config(
        vocab_size=v, n_embd=64, n_layer=2, n_head=2, n_positions=64, bos_token_id=eos, eos_token_id=eos)),
    "llama": lambda v, eos: __import__("transformers").LlamaForCausalLM(__import__("transformers").LlamaConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)),
}


@pytest.fixture(scope="module")
def local_lms(tiny_world_dir, tmp_path_factory):
    """{name: dir} of a tiny GPT-2 and a tiny LLaMA, each saved with the BPE trained on the world's references."""
    from raycap.inputs import load_world

    world = load_world(tiny_world_dir)
    texts = [r for i in range(world.config.n_labelled) for r in world.references("train", i)]
    tok = train_bpe(texts, vocab_size=300)
    root = tmp_path_factory.mktemp("lms")
    out = {}
    for name, build in LMS.items():
        torch.manual_seed(0)
        path = root / name
        build(len(tok), tok.eos_token_id).save_pretrained(path)
        tok.save_pretrained(str(path))
        out[name] = path
    return out


def test_bpe_round_trips_world_captions(local_lms):
    tok = load_tokenizer(local_lms["gpt2"])
    text = "a large green star at top left and a small red circle at bottom"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok.decode(ids) == text and tok.eos_token_id is not None


def stage_config(tmp_path, world, lm, mapper, train_lm):
    cfg = {"seed": 0, "threads": 2, "data": {"kind": "world", "path": str(world)},
           "retriever": {"path": str(world / "retriever")},
           "model": {"lm": str(lm), "mapper": mapper, "prefix_length": 4, "mapper_layers": 1, "clip_length": 2,
                     "train_lm": train_lm},
           "training": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5, "max_new_tokens": 16,
                        "val_images": 50},
           "eval_images": 100}
    path = tmp_path / "stage.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.mark.parametrize("lm,mapper,train_lm", [("gpt2", "mlp", True), ("gpt2", "transformer", False),
                                                ("llama", "mlp", False), ("llama", "transformer", True)])
def test_supervised_stage_for_each_variant(tiny_world_dir, local_lms, tmp_path, lm, mapper, train_lm):
    from transformers import AutoModelForCausalLM

    from raycap.inputs import load_captioner
    from raycap.pretrain import main as pretrain_main

    metrics = pretrain_main(["captioner", "--config", str(stage_config(tmp_path, tiny_world_dir, local_lms[lm],
                                                                       mapper, train_lm)),
                             "--out", str(tmp_path / "out")])
    for key in ("p_at_1", "wellformed", "faithful", "train_images"):
        assert key in metrics, key
    captioner, tok = load_captioner(tmp_path / "out" / "captioner")
    assert captioner.config.mapper == mapper and captioner.config.eos_token_id == tok.eos_token_id
    before = AutoModelForCausalLM.from_pretrained(local_lms[lm]).state_dict()
    after = captioner.lm.state_dict()
    changed = any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert changed == train_lm  # a frozen LM leaves the stage bit for bit as it came in
    log = [json.loads(line) for line in (tmp_path / "out" / "work" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[1]["val_loss"] < log[0]["val_loss"]


@pytest.mark.parametrize("lm,method", [("gpt2", "discritune"), ("llama", "discritune"), ("gpt2", "gumbel")])
def test_rl_on_a_bpe_captioner_with_the_word_level_retriever(tiny_world_dir, local_lms, tmp_path, lm, method):
    """DiscriTune (the retriever re-reads the decoded text) and Gumbel (soft BPE tokens reach the word-level
    text tower through the token map, which is not the identity here)."""
    from raycap.pretrain import main as pretrain_main
    from raycap.train import main as train_main

    cfg = stage_config(tmp_path, tiny_world_dir, local_lms[lm], "mlp", True)
    pretrain_main(["captioner", "--config", str(cfg), "--out", str(tmp_path / "sup")])
    args = [a for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path") for a in ("--set", s)]
    final = train_main(["--config", "world-demo", "--out", str(tmp_path / "rl"), "--runtime", "local", *args,
                        "--set", f"captioner.path={tmp_path / 'sup' / 'captioner'}", "--set", "rl.steps=2",
                        "--set", "eval.images=100", "--set", "rl.sampling.max_new_tokens=12", "--set", "eval.every=2",
                        "--set", "threads=2", "--set", "eval.report=false", "--set", "eval.test_table=false",
                        "--set", "rl.batch_size=24",
                        "--set", "rl.reward.num_candidates=24", "--set", f"rl.method={method}", "--set", f"rl.self_check.gate={method == 'discritune'}"])
    assert final["updates"] == 2 and 0 <= final["p_at_1"] <= 1
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert records[2]["kl"] > 0
    if method == "discritune":
        assert all(isinstance(r["example"], str) for r in records[1:])
    else:
        from raycap.inputs import load_captioner, load_retriever
        from raycap.config import RetrieverConfig
        from raycap.models.vocab import build_token_map

        _, tok = load_captioner(tmp_path / "sup" / "captioner")
        assert not build_token_map(tok, load_retriever(RetrieverConfig(path=str(tiny_world_dir / "retriever")))).identity
        assert -1 <= records[2]["clip_cos"] <= 1


def test_stage_config_errors_are_one_line(tmp_path, capsys):
    from raycap.pretrain import main as pretrain_main

    path = tmp_path / "bad.yaml"
    path.write_text("model: {lm: x, mapper: lstm}\n")
    with pytest.raises(SystemExit) as e:
        pretrain_main(["captioner", "--config", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "bad.yaml: model.mapper" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_main(["captioner", "--out", str(tmp_path / "o")])
    assert "--config FILE.yaml is required" in capsys.readouterr().err
