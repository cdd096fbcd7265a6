"""The text-only world LM (`raycap pretrain world-lm`) and world captioners that start from it: its text is the
world's language on other scenes, training lowers its loss, a frozen LM stays the world LM's weights through the
supervised stage, and a mismatched or missing LM is refused in one line."""
import json

import pytest
import torch
from conftest import TINY

from raycap.data.world import World, WorldConfig
from raycap.models.clipcap import ClipCap, TransformerMapper
from raycap.models.safetensors_io import load_weights
from raycap.models.tokenizers import world_tokenizer
from raycap.pretrain import main
from raycap.supervised.world_lm import TEXT_SEED_OFFSET, fresh_lm, sequences, validation_loss, world_text


@pytest.fixture(scope="module")
def world_lm_dir(tiny_world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wlm") / "lm"
    main(["world-lm", "--out", str(out), "--world", str(tiny_world_dir), "--lm-steps", "40", "--lm-scenes", "200",
          "--threads", "2"])
    return out


def test_the_text_is_the_worlds_language_on_scenes_of_another_seed():
    config = WorldConfig(n_train=50)
    train, val = world_text(config, 20)
    assert len(train) == 20 * config.refs_per_image and len(val) == 500 * config.refs_per_image
    text_world = World(config.model_copy(update={"seed": config.seed + TEXT_SEED_OFFSET, "n_train": 520}))
    assert train[:5] == text_world.references("train", 0)
    assert train[:5] != World(config).references("train", 0)  # not the images' own references
    vocab = set(config.vocabulary())
    assert all(set(t.split()) <= vocab for t in train + val)
    assert world_text(config, 20) == (train, val)  # deterministic
    docs, _ = world_text(config, 20, per_text=3, sep="<eos>")  # a scene's references in runs of 3
    assert docs[0] == " <eos> ".join(train[:3]) and docs[1] == " <eos> ".join(train[3:5]) and len(docs) == 40


def test_sequences_start_with_eos_and_mask_only_padding():
    tok = world_tokenizer(WorldConfig().vocabulary())
    inputs, labels = sequences(tok, ["a red circle", "a shape"], 40)
    eos = tok.eos_token_id
    ids = [tok.convert_tokens_to_ids(w) for w in "a red circle".split()]
    assert inputs[0].tolist() == [eos, *ids]
    assert labels[0].tolist() == [*ids, eos]
    assert labels[1].tolist()[:3] == [ids[0], tok.convert_tokens_to_ids("shape"), eos] and labels[1, 3] == -100


def test_world_lm_is_trained_and_saved_with_its_tokenizer(world_lm_dir, tiny_world_dir):
    from raycap.models.clip import Retriever
    from raycap.supervised.world_lm import load_world_lm

    metrics = json.loads((world_lm_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["sampled_wellformed"] <= 1.0 and metrics["steps"] == 40
    tok = Retriever.from_pretrained(tiny_world_dir / "retriever").tokenizer
    lm = load_world_lm(world_lm_dir, tok)
    config = WorldConfig.parse(json.loads((tiny_world_dir / "world.json").read_text()))
    per_text = metrics["references_per_text"]
    assert per_text == 3  # the default: documents of three references of a scene
    _, val = world_text(config, 200, per_text, tok.eos_token)
    x, y = sequences(tok, val, min(41 * per_text, lm.config.n_positions - 1))
    assert validation_loss(lm, x, y) == pytest.approx(metrics["val_loss"], abs=1e-3)
    torch.manual_seed(0)
    fresh = fresh_lm(tok, {k: getattr(lm.config, k) for k in ("n_embd", "n_layer", "n_head", "n_positions")})
    assert metrics["val_loss"] < validation_loss(fresh, x, y) - 0.5


def test_a_frozen_world_lm_keeps_its_weights_and_a_tuned_one_learns(world_lm_dir, tiny_world_dir, tmp_path):
    lm_weights = load_weights(world_lm_dir / "lm" / "model.safetensors")
    for freeze, mapper in ((True, "transformer"), (False, "mlp")):
        out = tmp_path / f"w-{freeze}"
        main(["world", "--out", str(out), "--retriever", str(tiny_world_dir / "retriever"), "--stages", "captioner",
              "--lm", str(world_lm_dir), "--captioner-mapper", mapper, "--probe-images", "0",
              *(["--freeze-lm"] if freeze else []), *TINY])
        captioner = ClipCap.from_pretrained(out / "captioner")
        assert captioner.config.train_lm is not freeze and captioner.config.mapper == mapper
        assert isinstance(captioner.mapper, TransformerMapper) == (mapper == "transformer")
        saved = captioner.lm.state_dict()
        same = all(torch.equal(saved[k], v) for k, v in lm_weights.items() if k in saved)
        assert same is freeze  # frozen: the world LM's own weights; tuned: moved from them ...
        drift = max(float((saved[k] - v).abs().max()) for k, v in lm_weights.items() if k in saved)
        assert drift < 0.05  # ... but only a few warm-up steps' worth (a fresh LM's weights differ by ~1)
        metrics = json.loads((out / "metrics.json").read_text())["captioner"]
        assert metrics["train_lm"] is not freeze and metrics["lm"] == str(world_lm_dir)


def test_an_lm_of_another_vocabulary_or_none_is_refused_in_one_line(world_lm_dir, tiny_world_dir, tmp_path, capsys):
    other = tmp_path / "other"
    (other / "lm").mkdir(parents=True)
    lm = fresh_lm(world_tokenizer(["one", "two"]), {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16})
    lm.save_pretrained(other / "lm")
    world_tokenizer(["one", "two"]).save_pretrained(str(other / "tokenizer"))
    for extra, needle in ((["--lm", str(other)], "not the retriever's"), (["--freeze-lm"], "--freeze-lm: needs --lm"),
                          (["--lm", str(tmp_path / "nope")], "not a world LM directory"),
                          (["--world", str(tiny_world_dir)], "--world is for `pretrain world-lm`")):
        out = tmp_path / f"x{len(needle)}"
        with pytest.raises(SystemExit) as e:
            main(["world", "--out", str(out), "--retriever", str(tiny_world_dir / "retriever"),
                  "--probe-images", "0", *extra, *TINY])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1
        assert not out.exists()  # refused before anything is written


def test_the_console_command_prints_its_result_without_library_notices(tiny_world_dir, tmp_path):
    """What a user sees from `raycap pretrain world-lm` on a machine without a GPU: the result line, no DeepSpeed
    accelerator guess (transformers imports DeepSpeed when it saves the model), no traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([sys.executable, "-m", "raycap", "pretrain", "world-lm", "--out", str(tmp_path / "lm"),
                        "--world", str(tiny_world_dir), "--lm-steps", "2", "--lm-scenes", "10", "--threads", "1"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    printed = r.stdout + r.stderr
    assert "world LM (validation):" in printed
    assert "Setting accelerator" not in printed and "Traceback" not in printed
