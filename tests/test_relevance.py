"""`world-relevance`, the second method's named config (issue 41): the Gumbel CLIP-relevance stage from the
supervised captioner, ending with a test table scored against the references too."""
import json

import torch

from raycap.config import RunConfig
from raycap.inputs import load_captioner
from raycap.report.gallery import REFERENCE_KEYS
from raycap.train import compare_final
from raycap.train import main as train_main
from world_runs import SHORT, world_args


def test_world_relevance_trains_the_captioner_and_scores_its_test_table_against_the_references(
        tiny_world_dir, tmp_path, capfd):
    out = tmp_path / "run"
    final = train_main(["--config", "world-relevance", "--out", str(out), "--runtime", "local",
                        *world_args(tiny_world_dir), *SHORT, "--set", "rl.steps=2", "--set", "eval.report=false"])
    assert final["updates"] == 2
    rows = final["test_table"]["rows"]
    assert [(r["captioner"], r["decoding"]) for r in rows] == [("supervised", "greedy"), ("fine-tuned", "greedy")]
    for r in rows:
        assert all(isinstance(r[k], float) for k in REFERENCE_KEYS), r
    printed = capfd.readouterr()
    header = next(line for line in printed.out.splitlines() if "p_at_1" in line and "bleu4" in line)
    assert all(k in header for k in REFERENCE_KEYS)
    assert "PTBTokenizer" not in printed.out + printed.err  # the tokenizer's Java notice per call is dropped
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "loss" in r]
    assert len(updates) == 2 and all("clip_cos" in r for r in updates)  # the Gumbel relevance loss, not REINFORCE
    tuned, _ = load_captioner(out / "final")
    supervised, _ = load_captioner(tiny_world_dir / "captioner")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), supervised.state_dict().values()))

    # without eval.test_table_references the same comparison has no reference columns
    cfg = RunConfig.model_validate(json.loads((out / "config.json").read_text()))
    cfg.eval.test_table_references = False
    plain = compare_final(cfg, out).headline()
    assert not any(k in r for r in plain["rows"] for k in REFERENCE_KEYS)


def test_the_ptb_tokenizers_notices_are_dropped_and_other_stderr_lines_kept(capfd):
    import os

    from raycap.metrics.captions import ngram_metrics, ptb_notices_dropped

    scores = ngram_metrics(["a red circle"], [["a red circle", "a shape"]], meteor=False)
    assert scores["bleu1"] > 0.9
    with ptb_notices_dropped():
        os.write(2, b"PTBTokenizer tokenized 3 tokens at 10.0 tokens per second.\nsomething else went wrong\n")
    err = capfd.readouterr().err
    assert "PTBTokenizer" not in err and "something else went wrong" in err
