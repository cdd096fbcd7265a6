"""BLIP as a raycap captioner: a tiny BlipForConditionalGeneration (random init, saved locally) decodes with the
shared decoding code (cache == no cache, greedy == beam 1, log-probs == teacher forcing), keeps its vision tower
frozen in RL, trains from scratch in the supervised stage, and runs DiscriTune on both runtimes with the frozen
world retriever as reward."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from make_tiny_blip import save_tiny_blip  # noqa: E402

from raycap.models.blip import BlipCaptioner  # noqa: E402
from raycap.models.tokenizers import load_tokenizer  # noqa: E402
from world_runs import world_sets  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tiny_world_dir, tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "blip", tiny_world_dir / "retriever" / "tokenizer")


@pytest.fixture(scope="module")
def blip(blip_dir):
    return BlipCaptioner.from_blip(str(blip_dir), load_tokenizer(blip_dir), max_new_tokens=8).eval()


def world_images(tiny_world_dir, n=3):
    from PIL import Image

    from raycap.inputs import load_world

    world = load_world(tiny_world_dir)
    return [Image.fromarray(world.image("test", i)) for i in range(n)]


def test_decoding_is_consistent_and_the_vision_tower_is_frozen(blip, tiny_world_dir):
    feats = blip.encode_images(world_images(tiny_world_dir))
    assert feats.shape == (3, 1 + 36, 64)  # 48 px / 8 px patches + the class token, width 64
    a, b = blip.generate(feats, mode="greedy"), blip.generate(feats, mode="greedy", use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    beam1 = blip.generate(feats, mode="beam", num_beams=1)
    assert beam1.tolist() == a.tolist()
    g = torch.Generator().manual_seed(0)
    s = blip.generate(feats, mode="sample", num_samples=2, generator=g)
    lp = blip.log_probs(feats, s.tokens, s.lengths)
    torch.testing.assert_close(lp, s.logprobs, atol=1e-5, rtol=1e-4)
    blip.set_trainable(True)
    assert not any(p.requires_grad for p in blip.model.vision_model.parameters())
    assert all(p.requires_grad for p in blip.model.text_decoder.parameters())
    pixels = blip.pixels(world_images(tiny_world_dir))
    torch.testing.assert_close(blip.logits(pixels, a.tokens), blip.logits(feats, a.tokens))  # pixels or features


def save_captioner(blip, blip_dir, path):
    """A raycap captioner dir: the captioner and its tokenizer (as the supervised stage writes it)."""
    blip.save_pretrained(path)
    load_tokenizer(blip_dir).save_pretrained(str(path / "tokenizer"))
    return path


def test_save_load_round_trip_through_the_captioner_loader(blip, blip_dir, tiny_world_dir, tmp_path):
    from raycap.inputs import load_captioner

    back, tok = load_captioner(save_captioner(blip, blip_dir, tmp_path / "c"))
    assert tok.bos_token == "[DEC]"
    feats = blip.encode_images(world_images(tiny_world_dir))
    assert isinstance(back, BlipCaptioner) and back.generate(feats).tolist() == blip.generate(feats).tolist()


def stage(tmp_path, world, blip_dir):
    cfg = {"seed": 0, "threads": 2, "data": {"kind": "world", "path": str(world)},
           "retriever": {"path": str(world / "retriever")},
           "model": {"kind": "blip", "blip": str(blip_dir), "train_vision": True},
           "training": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5, "max_new_tokens": 12,
                        "val_images": 50},
           "eval_images": 100}
    (tmp_path / "stage.yaml").write_text(json.dumps(cfg))
    return tmp_path / "stage.yaml"


@pytest.mark.parametrize("runtime,features", [("local", "cached"), ("ray", "per_batch")])
def test_supervised_stage_then_discritune(tiny_world_dir, blip_dir, tmp_path, runtime, features):
    """The ray run reads BLIP's vision features per batch (`ImageRows` through the object store, the tower run
    on each role's device)."""
    from transformers import BlipForConditionalGeneration

    from raycap.ray_start import free_port
    from raycap.pretrain import main as pretrain_main
    from raycap.train import main as train_main

    metrics = pretrain_main(["captioner", "--config", str(stage(tmp_path, tiny_world_dir, blip_dir)),
                             "--out", str(tmp_path / "sup")])
    assert "p_at_1" in metrics and "wellformed" in metrics
    trained = BlipForConditionalGeneration.from_pretrained(tmp_path / "sup" / "captioner" / "blip")
    fresh = BlipForConditionalGeneration.from_pretrained(blip_dir)
    assert not torch.equal(trained.vision_model.embeddings.patch_embedding.weight,
                           fresh.vision_model.embeddings.patch_embedding.weight)  # trained from scratch
    sets = [a for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path") for a in ("--set", s)]
    out = tmp_path / "rl"
    final = train_main(["--config", "world-demo", "--out", str(out), "--runtime", runtime, *sets,
                        "--set", f"captioner.path={tmp_path / 'sup' / 'captioner'}", "--set", "rl.steps=2",
                        "--set", "eval.images=100", "--set", "rl.sampling.max_new_tokens=8", "--set", "eval.every=2",
                        "--set", "threads=1", "--set", "eval.report=false", "--set", "eval.test_table=false",
                        "--set", "rl.batch_size=24", "--set", "eval.select_samples=4",
                        "--set", "rl.reward.num_candidates=24", "--set", f"runtime.dashboard_port={free_port()}",
                        "--set", f"captioner.vision_features={features}"])
    assert final["updates"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[2]["kl"] > 0 and isinstance(records[1]["example"], str)
    rl = BlipForConditionalGeneration.from_pretrained(out / "final" / "blip")
    assert torch.equal(rl.vision_model.embeddings.patch_embedding.weight,
                       trained.vision_model.embeddings.patch_embedding.weight)  # RL leaves the vision tower


def test_gumbel_with_blip_is_one_line(tiny_world_dir, blip, blip_dir, tmp_path, capsys):
    from raycap.train import main as train_main

    save_captioner(blip, blip_dir, tmp_path / "c")
    sets = [a for s in world_sets(tiny_world_dir) if not s.startswith("captioner.path") for a in ("--set", s)]
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "world-demo", "--out", str(tmp_path / "g"), "--runtime", "local", *sets,
                    "--set", f"captioner.path={tmp_path / 'c'}", "--set", "rl.method=gumbel",
                    "--set", "rl.self_check.gate=false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a BlipCaptioner" in err and "use rl.method=discritune for it" in err


def test_cached_features_that_cannot_fit_are_refused_with_the_estimate(blip, monkeypatch):
    """BLIP's features per image come from its vision config alone; a run whose cached features would not fit is
    refused in one line, before any image is read, and BLIP-base at COCO scale (577 x 768) is ~219 GB."""
    from types import SimpleNamespace

    from raycap.errors import UserError
    from raycap.inputs import check_cached_inputs_fit, own_feature_shape

    v = blip.model.config.vision_config
    shape = own_feature_shape(blip)
    assert shape == (1 + (v.image_size // v.patch_size) ** 2, v.hidden_size)

    class NoImages:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def image(self, i):
            pytest.fail("no image is read before the estimate")

    per_image = shape[0] * shape[1] * 4
    check_cached_inputs_fit(blip, 1020, memory_bytes=4 * 1020 * per_image)  # fits in half
    with pytest.raises(UserError, match=r"1,020 images .* more than 50% of this machine") as e:
        check_cached_inputs_fit(blip, 1020, memory_bytes=1020 * per_image)
    assert "\n" not in str(e.value) and "captioner.vision_features: per_batch" in str(e.value)
    from raycap.models.blip import feature_shape

    base = SimpleNamespace(reads_retriever_embeddings=False, cached_input_shape=feature_shape(
        SimpleNamespace(image_size=384, patch_size=16, hidden_size=768)))
    with pytest.raises(UserError, match=r"577 x 768 float32.* need 218\.5 GB"):
        check_cached_inputs_fit(base, 113_287 + 5000 + 5000, memory_bytes=128 * 2**30)


def test_vision_features_auto_goes_per_batch_when_cached_ones_cannot_fit(blip):
    """`captioner.vision_features`: auto caches BLIP's features when they fit in half the memory and otherwise
    reads them per batch (said in one line); cached is refused when it cannot fit; a ClipCap always reads the
    retriever's embeddings."""
    from types import SimpleNamespace

    from raycap.errors import UserError
    from raycap.inputs import own_feature_shape, vision_feature_mode

    shape = own_feature_shape(blip)
    per_image = shape[0] * shape[1] * 4
    lines = []
    assert vision_feature_mode(blip, 100, "auto", memory_bytes=1000 * per_image, log=lines.append) == "cached"
    assert vision_feature_mode(blip, 100, "auto", memory_bytes=100 * per_image, log=lines.append) == "per_batch"
    assert len(lines) == 1 and lines[0].startswith("captioner.vision_features auto -> per_batch: captioner "
                                                   "features for 100 images")
    assert vision_feature_mode(blip, 100, "per_batch", memory_bytes=1000 * per_image) == "per_batch"
    with pytest.raises(UserError, match="need"):
        vision_feature_mode(blip, 100, "cached", memory_bytes=100 * per_image)
    clipcap = SimpleNamespace(reads_retriever_embeddings=True)
    assert vision_feature_mode(clipcap, 10**6, "per_batch", memory_bytes=1) == "cached"


def test_image_rows_read_per_batch_decode_and_score_as_cached_features(blip, blip_dir, tiny_world_dir):
    """BLIP reading `ImageRows` (pixels read per batch, the vision tower run on the captioner's device) gives
    the captions, teacher-forced log-probs and evaluation of the cached features; slicing stays lazy, so an
    evaluation of n images reads only its chunks."""
    from raycap.data.sources import WorldSource
    from raycap.inputs import ImageRows, captioner_inputs, load_world
    from raycap.supervised.captioner import decode_images

    source = WorldSource(load_world(tiny_world_dir), "test").subset(range(12))
    read = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def image(self, i):
            read.append(i)
            return self.inner.image(i)

    rows = ImageRows(Spy(source), blip.processor)
    feats = captioner_inputs(blip, source, None, vision_features="cached")
    lazy = captioner_inputs(blip, source, None, vision_features="per_batch")
    assert isinstance(lazy, ImageRows) and len(lazy) == 12 and not read
    view = rows[3:9]
    assert isinstance(view, ImageRows) and len(view) == 6 and not read
    idx = torch.tensor([5, 0, 11])
    torch.testing.assert_close(blip.features(rows[idx]), feats[idx], atol=1e-5, rtol=1e-5)
    assert read == [5, 0, 11]
    read.clear()
    a = blip.generate(feats[3:9], mode="greedy")
    b = blip.generate(view.to(blip.device), mode="greedy")
    assert read == list(range(3, 9)) and a.tolist() == b.tolist()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = blip.generate(feats[idx], mode="sample", num_samples=3, generator=g1)
    s2 = blip.generate(rows[idx], mode="sample", num_samples=3, generator=g2)
    assert s1.tolist() == s2.tolist()
    torch.testing.assert_close(blip.log_probs(rows[idx], s1.tokens, s1.lengths),
                               blip.log_probs(feats[idx], s1.tokens, s1.lengths), atol=1e-5, rtol=1e-4)
    tok = load_tokenizer(blip_dir)
    cached = decode_images(blip, tok, None, feats, None, "beam", num_beams=2, batch_size=4)
    per_batch = decode_images(blip, tok, None, lazy, None, "beam", num_beams=2, batch_size=4)
    assert cached == per_batch and len(cached) == 12


def test_the_retrievers_image_tower_copies_into_blips_and_distils_past_the_missing_pre_norm(tiny_world_dir, tmp_path):
    """BLIP's vision tower from the world retriever's: the copy is exactly the open_clip tower without its
    pre-layernorm (which BLIP lacks); distilling on unlabelled images brings it closer to the tower with it; the saved
    BLIP loads as a raycap captioner whose features are that tower's and whose processor normalises as the
    retriever does."""
    from make_tiny_blip import save_blip_on_retriever
    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel

    from raycap.models.blip import blip_vision_config_of, blip_vision_state_from_open_clip
    from raycap.models.clip import Retriever
    from raycap.supervised.blip_vision import relative_error, tower_outputs

    retriever = Retriever.from_pretrained(tiny_world_dir / "retriever").eval()
    visual = retriever.model.visual
    student = BlipVisionModel(BlipVisionConfig(**blip_vision_config_of(visual))).eval()
    student.load_state_dict(blip_vision_state_from_open_clip(visual))
    pixels = torch.randn(3, 3, retriever.image_size, retriever.image_size)
    ln_pre = visual.ln_pre
    visual.ln_pre = torch.nn.Identity()
    try:
        with torch.no_grad():
            torch.testing.assert_close(student(pixel_values=pixels).last_hidden_state, tower_outputs(visual, pixels),
                                       atol=1e-5, rtol=1e-5)
    finally:
        visual.ln_pre = ln_pre

    metrics = save_blip_on_retriever(tmp_path / "blip", tiny_world_dir / "retriever", tiny_world_dir, steps=30,
                                     images=200)
    assert metrics["relative_error_distilled"] < metrics["relative_error_copied"]
    captioner = BlipCaptioner.from_blip(str(tmp_path / "blip"), load_tokenizer(tmp_path / "blip"))
    images = world_images(tiny_world_dir)
    processed = captioner.pixels(images)
    torch.testing.assert_close(processed, retriever.pixels(np.stack([np.asarray(i) for i in images])))
    assert relative_error(captioner.model.vision_model.eval(), visual, processed) < metrics["relative_error_copied"]
