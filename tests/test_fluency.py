"""REINFORCE's guards on a cosine reward (issue 41): a fluency head on the retriever's text side (Cho et al. 2022's
grammar head) and per-term reward normalisation (BalCapRL)."""
import json

import numpy as np
import pytest
import torch

from raycap.config import WORLD_DIR, load_config
from raycap.models.fluency import FluencyModel, corruptions
from raycap.pretrain import main as pretrain_main
from raycap.rl import rewards
from raycap.train import main as train_main
from world_runs import FAST, world_args


@pytest.fixture(scope="module")
def shipped_head(tmp_path_factory):
    """The fluency model of the shipped world: its retriever's text tower, its 800 labelled images' references."""
    out = tmp_path_factory.mktemp("fluency") / "head"
    metrics = pretrain_main(["fluency", "--out", str(out), "--fluency-steps", "150"])
    return out, metrics


def test_corruptions_repeat_insert_and_shuffle_the_words():
    rng = np.random.default_rng(0)
    repeated, inserted, shuffled = corruptions("a large red circle at top left", rng, ["blue", "star"])
    words = "a large red circle at top left".split()
    assert len(repeated.split()) > len(words) and set(repeated.split()) == set(words)
    assert len(inserted.split()) == len(words) + 1 and ({"blue", "star"} & set(inserted.split()))
    assert sorted(shuffled.split()) == sorted(words) and shuffled.split() != words


def test_the_shipped_worlds_model_tells_references_from_broken_text(shipped_head):
    """Held out, the model accepts most references and rejects most of each corruption; on captions it never saw it
    scores a true description above its shuffled words and a word-salad repetition; its text tower is a fine-tuned
    copy (the shipped retriever's own weights are not the ones it holds)."""
    out, metrics = shipped_head
    assert metrics["held_out_accuracy_reference"] > 0.7, metrics
    assert all(metrics[f"held_out_accuracy_{k}"] > 0.7 for k in ("repeated", "inserted", "shuffled")), metrics
    from raycap.models.clip import Retriever

    model = FluencyModel.from_pretrained(out)
    texts = ["a large red circle at top left and a small blue star at bottom",
             "circle a top red at large left blue and star small a bottom at",
             "a large red red red circle circle at top top left"]
    score = model.log_fluency(texts)
    assert score.dtype == torch.float32 and score[0] > score[1] and score[0] > score[2], score
    shipped, copied = Retriever.from_pretrained(WORLD_DIR / "retriever"), model.text
    assert not torch.equal(shipped.model.token_embedding.weight, copied.model.token_embedding.weight)
    assert metrics["retriever"] == str(WORLD_DIR / "retriever")


def test_the_fluency_term_and_normalisation_change_the_reward_as_they_claim():
    task, cos = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([30.0, 10.0, 20.0])
    fluent = torch.tensor([-5.0, 0.0, 0.0])
    assert torch.equal(rewards.combine([(1.0, task), (0.2, cos)]), task + 0.2 * cos)  # the sum, as before
    both = rewards.combine([(1.0, task), (0.2, cos), (1.0, fluent)])
    assert torch.allclose(both - rewards.combine([(1.0, task), (0.2, cos)]), fluent)
    z = rewards.combine([(1.0, task), (0.5, cos)], normalise=True)
    def standard(t):
        return (t - t.mean()) / t.std(unbiased=False)

    assert torch.allclose(z, standard(task) + 0.5 * standard(cos), atol=1e-5)  # one scale, weighed as written
    assert torch.allclose(z, torch.tensor([-0.6124, 0.6124, 0.0]), atol=1e-4)  # the cosine's x10 scale is gone
    with pytest.raises(Exception, match="needs reward.fluency_head"):
        load_config("world-demo", ["rl.reward.fluency_coef=1"])


def test_a_run_with_the_fluency_term_scores_with_the_head_and_refuses_a_missing_one(tiny_world_dir, tmp_path,
                                                                                     capsys):
    refs = tmp_path / "refs.json"
    from raycap.data.world import World, WorldConfig

    world = World(WorldConfig.parse(json.loads((tiny_world_dir / "world.json").read_text())))
    refs.write_text(json.dumps([r for i in range(world.config.n_labelled) for r in world.references("labelled", i)]))
    head = tmp_path / "head"
    pretrain_main(["fluency", "--out", str(head), "--retriever", str(tiny_world_dir / "retriever"),
                   "--references", str(refs), "--fluency-steps", "20"])
    common = ["--config", "world-demo", "--runtime", "local", *world_args(tiny_world_dir), *FAST,
              "--set", "rl.steps=2", "--set", "rl.self_check.gate=false", "--set", "rl.reward.kind=cosine",
              "--set", "rl.algorithm.baseline=loo", "--set", "rl.sampling.num_samples=2"]
    with pytest.raises(SystemExit) as e:
        train_main([*common, "--out", str(tmp_path / "missing"), "--set", "rl.reward.fluency_coef=1",
                    "--set", f"rl.reward.fluency_head={tmp_path / 'nowhere'}"])
    assert e.value.code == 2 and "rl.reward.fluency_head" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    runs = {}
    for name, extra in (("plain", []), ("fluent", ["--set", "rl.reward.fluency_coef=1", "--set",
                                                   f"rl.reward.fluency_head={head}"])):
        train_main([*common, "--out", str(tmp_path / name), *extra])
        runs[name] = [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
    # the same first rollouts (same seed, same weights), rewarded lower by the model's log P(fluent) < 0
    assert runs["plain"][0]["example"] == runs["fluent"][0]["example"]
    plain, fluent = runs["plain"][0], runs["fluent"][0]
    assert fluent["reward_mean"] < plain["reward_mean"] and fluent["term_fluency"] < 0
    assert fluent["term_cosine"] == pytest.approx(plain["reward_mean"], abs=1e-5)  # the terms apart, logged
    assert fluent["reward_mean"] == pytest.approx(fluent["term_cosine"] + fluent["term_fluency"], abs=1e-4)
    assert "term_cosine" not in plain  # one term: the reward itself


def test_bad_references_are_refused_in_one_line_naming_the_file(tmp_path, capsys):
    for content, needle in (("not json", "not valid JSON"), ('{"a": 1}', "must be a JSON list of caption strings"),
                            ('["a red circle"]', "at least 10 distinct references")):
        refs = tmp_path / "refs.json"
        refs.write_text(content)
        with pytest.raises(SystemExit) as e:
            pretrain_main(["fluency", "--out", str(tmp_path / "head"), "--references", str(refs)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "head").exists()
