"""`world-paper`, DiscriTune as the paper runs it (issue 41): greedy rollouts, a running-mean baseline, the in-batch
discriminative reward with hard distractors, no KL guard; and the distractor curriculum in a run."""
import json

from raycap.config import load_config
from raycap.train import main as train_main
from world_runs import FAST, world_args


def test_world_paper_is_the_papers_update_and_runs_with_a_distractor_curriculum(tiny_world_dir, tmp_path):
    cfg = load_config("world-paper")
    rl = cfg.rl
    assert (rl.method, rl.sampling.rollout, rl.sampling.num_samples, rl.algorithm.baseline, rl.algorithm.kl_coef,
            rl.reward.kind, rl.reward.num_candidates, rl.batch_size, rl.reward.hard_distractors,
            rl.algorithm.length_normalise, rl.self_check.gate) == (
        "discritune", "greedy", 1, "mean", 0.0, "discriminative", 100, 100, 10, True, False)
    out = tmp_path / "run"
    final = train_main(["--config", "world-paper", "--out", str(out), "--runtime", "local",
                        *world_args(tiny_world_dir), *FAST, "--set", "rl.steps=3",
                        "--set", "rl.reward.hard_distractors=0",
                        "--set", "rl.reward.curriculum=[{updates: 1}, {updates: 1, hard_distractors: 5, "
                                 "skip_nearest: 5}, {updates: 1, hard_distractors: 5}]"])
    assert final["updates"] == 3
    updates = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(updates) == 3 and all("kl" in r for r in updates)
    saved = json.loads((out / "config.json").read_text())["rl"]["reward"]["curriculum"]
    assert [(st["updates"], st["hard_distractors"], st["skip_nearest"]) for st in saved] == [(1, 0, 0), (1, 5, 5),
                                                                                             (1, 5, 0)]
