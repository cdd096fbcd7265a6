"""What a run prints per validation: rounded headline numbers, not the raw metrics dict (which stays in
metrics.jsonl)."""
from raycap.runlog import metrics_line


def test_a_validation_line_is_short_and_rounded():
    metrics = {"p_at_1": 0.6559999775886536, "wellformed": 0.998, "faithful": 0.5350000262260437,
               "precision": float("nan"), "recall": 0.41000001, "mean_length": 7.8125, "distinct_2": 0.123456,
               "faithful_2obj": 0.5, "top_caption": "a red circle", "examples": [{"caption": "x"}]}
    assert metrics_line(metrics) == "P@1 0.656, wellformed 0.998, faithful 0.535, recall 0.410, length 7.8"


def test_a_collapse_warning_follows_the_numbers():
    line = metrics_line({"p_at_1": 0.01, "collapse_warning": "captions collapsed: 100% of the images get the same"})
    assert line == "P@1 0.010 (captions collapsed: 100% of the images get the same)"


def _fake_run(tmp_path, decoding: str, test_at_end: bool):
    """run_updates over 4 no-op updates, recording each evaluation's (split, decoding)."""
    from raycap.config import load_config
    from raycap.runlog import run_updates

    cfg = load_config("world-demo", [f"eval.decoding={decoding}", "rl.steps=4", "eval.every=2",
                                     "runtime.loggers=[]"])
    calls = []
    tmp_path.mkdir()

    def evaluate(split, decoding=None):
        calls.append((split, decoding))
        return {"p_at_1": 0.5 if decoding is None else 0.75}

    update = lambda step: {"train_p_at_1": 0.0, "kl": 0.0, "reward_mean": 0.0}  # noqa: E731
    final = run_updates(cfg, tmp_path, 0, update, evaluate, lambda step: None, log=lambda *_: None,
                        test_at_end=test_at_end)
    return calls, final


def test_a_trials_last_validation_decodes_as_the_run_ships(tmp_path):
    """A search's trial (test_at_end=False) is chosen on its last validation evaluation: with eval.decoding
    select, that one selects (the others stay greedy); a run's own validations stay greedy, its test selects."""
    calls, final = _fake_run(tmp_path / "trial", "select", test_at_end=False)
    assert calls == [("val", None), ("val", None), ("val", "select")]
    assert final["p_at_1"] == 0.75 and final["split"] == "val" and final["decoding"] == "select"
    calls, _ = _fake_run(tmp_path / "run", "select", test_at_end=True)
    assert calls == [("val", None), ("val", None), ("val", None), ("test", None)]
    calls, _ = _fake_run(tmp_path / "greedy-trial", "greedy", test_at_end=False)
    assert calls == [("val", None), ("val", None), ("val", None)]


def test_the_captioner_stage_reports_within_an_epoch(tmp_path, capsys, monkeypatch):
    """Progress per optimiser step (epoch, loss), not once per epoch: at GPT-2 size an epoch takes minutes."""
    import json

    import torch

    import raycap.progress
    from raycap.config import WORLD_DIR
    from raycap.models.loading import load_captioner
    from raycap.supervised.captioner import CaptionerTraining, train_on_references

    monkeypatch.setattr(raycap.progress, "LINE_EVERY_S", 0.0)  # every step's line (log files get one per 30 s)
    model, tokenizer = load_captioner(WORLD_DIR / "captioner")
    d = model.config.clip_dim
    emb = torch.nn.functional.normalize(torch.randn(6, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    refs = [["a small red circle", "a red shape"]] * 6  # 12 references: 3 steps of 4 per epoch
    train_on_references(model, tokenizer, emb, refs, emb[:2], refs[:2],
                        CaptionerTraining(epochs=2, batch_size=4, warmup_steps=1), tmp_path)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("captioner: ")]
    assert [x.split(",")[0] for x in lines] == [f"captioner: {i}/6 ({100 * i / 6:.0f}%)" for i in range(1, 7)]
    assert "epoch=1/2 loss=" in lines[0] and "val=" not in lines[0]
    assert "epoch=1/2" in lines[2] and "val=" in lines[2] and "epoch=2/2" in lines[5]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_many_short_epochs_validate_every_few_and_after_the_last(tmp_path, monkeypatch):
    """Few labels mean many short epochs: the validation pass runs at most MAX_VALIDATIONS times (3 here), after
    the last epoch always, so its cost does not grow with the epochs."""
    import json

    import torch

    import raycap.supervised.captioner as stage
    from raycap.config import WORLD_DIR
    from raycap.models.loading import load_captioner

    monkeypatch.setattr(stage, "MAX_VALIDATIONS", 3)
    model, tokenizer = load_captioner(WORLD_DIR / "captioner")
    noise = torch.randn(2, model.config.clip_dim, generator=torch.Generator().manual_seed(0))
    emb = torch.nn.functional.normalize(noise, dim=-1)
    refs = [["a small red circle"]] * 2  # one step per epoch
    stage.train_on_references(model, tokenizer, emb, refs, emb[:1], refs[:1],
                              stage.CaptionerTraining(epochs=7, batch_size=4, warmup_steps=1), tmp_path)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [3, 6, 7]
