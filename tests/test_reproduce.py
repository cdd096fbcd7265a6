"""The reproduction scripts (reproduce/): their tables and figures come from the run directories' results."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name):
    """A reproduce/ script as a module, its folder importable as when run (`python reproduce/NAME.py`)."""
    if str(ROOT / "reproduce") not in sys.path:
        sys.path.insert(0, str(ROOT / "reproduce"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "reproduce" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_label_curve_tables_and_plots_what_the_evaluations_wrote(tmp_path, capsys):
    curve = script("relevance_label_curve")
    assert [curve.epochs_for(n) for n in (100, 400, 800, 4000, 40000)] == [160, 40, 20, 4, 1]
    for n, base in ((100, 0.3), (800, 0.6)):
        for arm, gain in (("sup", 0.0), ("rel", 0.05)):
            (tmp_path / f"{arm}-{n}-test.json").write_text(json.dumps({"bleu4": base + gain, "refcompare": 0.5}))
    (tmp_path / "sup-4000-test.json").write_text("{}")  # its self-supervised arm not evaluated yet: left out
    curve.main(["--out", str(tmp_path), "--table-only"])
    table = (tmp_path / "label_curve.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| 100", "supervised"], ["| 100", "+ CLIP relevance"],
                                                             ["| 800", "supervised"], ["| 800", "+ CLIP relevance"]]
    assert table[3].split(" | ")[2] == "0.350" and table[2].split(" | ")[3] == "-"  # BLEU-4; CIDEr absent
    assert (tmp_path / "label_curve.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--sizes: 0 is not between 1 and the world's 40000"):
        curve.main(["--out", str(tmp_path / "new"), "--sizes", "100", "0"])
    assert not (tmp_path / "new").exists()  # refused before anything is written


def test_the_label_curve_resumes_only_what_finished_and_refuses_other_settings(tmp_path, monkeypatch):
    """A stage counts as done when its metrics file (written last) says so: a model dir whose save was cut short
    is trained again; the same --out with another seed is refused."""
    curve = script("relevance_label_curve")
    calls = []

    def fake_sh(*args, log):
        calls.append(args[0] if args[0] != "evaluate" else f"evaluate {Path(args[2]).parent.name}")
        if args[0] == "evaluate":
            Path(args[args.index("--json") + 1]).write_text(json.dumps({"bleu4": 0.5}))

    monkeypatch.setattr(curve, "sh", fake_sh)
    sup, rel = tmp_path / "sup-100", tmp_path / "rel-100"
    (sup / "captioner").mkdir(parents=True)
    (sup / "captioner" / "raycap_clipcap.json").write_text("{}")  # the save was killed after its first file
    (sup / "metrics.json").write_text(json.dumps({"retriever": {}}))
    rel.mkdir()
    (rel / "final_metrics.json").write_text(json.dumps({"p_at_1": 0.4}))  # the self-supervised run finished
    curve.main(["--out", str(tmp_path), "--sizes", "100"])
    assert calls == ["pretrain", "evaluate sup-100", "evaluate rel-100"]
    calls.clear()
    curve.main(["--out", str(tmp_path), "--sizes", "100"])
    assert calls == ["pretrain"]  # the fake pretrain wrote no metrics; both evaluations are kept
    with pytest.raises(SystemExit, match="made with {'seed': 0, 'config': 'world-relevance'}"):
        curve.main(["--out", str(tmp_path), "--sizes", "100", "--seed", "1"])


def test_the_evaluation_table_has_a_row_per_result_file(tmp_path, capsys):
    table = script("eval_table")
    (tmp_path / "a-val.json").write_text(json.dumps({"p_at_1": 0.4, "bleu4": 0.6}))
    table.main([str(tmp_path / "a-val.json")])
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| a-val | 0.400 | 0.600 | - |")


def test_the_transfer_table_compares_the_captioners_on_each_shifted_world(tmp_path, monkeypatch, capsys):
    """The shifted worlds are valid world dirs (the standard world's retriever beside each); every evaluation runs
    once (a re-run resumes); the table has the supervised value, the fine-tuned runs' mean (range) and the change."""
    transfer = script("discritune_transfer")
    base = tmp_path / "base"
    (base / "retriever").mkdir(parents=True)
    (base / "retriever" / "weights.bin").write_text("w")
    (base / "world.json").write_text(json.dumps({"version": 2, "max_objects": 3}))
    runs = []
    for name in ("ft-a", "ft-b", "sup"):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final_metrics.json").write_text("{}")
        runs.append(str(tmp_path / name))
    runs.pop()  # sup/final is the supervised captioner
    calls = []

    def fake_sh(*args, log):
        world, captioner = Path(args[args.index("--world-dir") + 1]), Path(args[args.index("--captioner") + 1])
        calls.append((world.name, captioner.parent.name))
        assert (world / "retriever" / "weights.bin").exists()
        shifted = json.loads((world / "world.json").read_text())
        tuned = captioner.parent.name.startswith("ft")
        cider = {"ft-a": 1.0, "ft-b": 1.2}.get(captioner.parent.name, 1.0)
        cider += 0.5 if world.name == "more-objects" else 0
        Path(args[args.index("--json") + 1]).write_text(json.dumps(
            {"p_at_1": 0.6 if tuned else 0.4, "cider": cider, "max_objects": shifted["max_objects"]}))

    monkeypatch.setattr(transfer, "sh", fake_sh)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--runs", *runs, "--supervised", str(tmp_path / "sup" / "final"),
            "--world-dir", str(base), "--shifts", "in-domain", "more-objects"]
    transfer.main(argv)
    assert len(calls) == 6 and {c[0] for c in calls} == {"in-domain", "more-objects"}
    assert json.loads((out / "worlds" / "more-objects" / "world.json").read_text())["max_objects"] == 4
    lines = (out / "transfer.md").read_text().splitlines()
    assert lines[2] == "| in-domain | the standard world | P@1 | 0.400 | 0.600 (0.600-0.600) | +0.200 |"
    assert lines[3] == "|  |  | CIDEr | 1.000 | 1.100 (1.000-1.200) | +0.100 |"
    assert lines[4].startswith("| more-objects | 2-4 objects")
    assert (out / "transfer.png").stat().st_size > 10_000
    calls.clear()
    transfer.main(argv)
    assert calls == []  # every evaluation exists: resumed, nothing re-run
    with pytest.raises(SystemExit, match="made with"):
        transfer.main([*argv, "--decoding", "beam"])
    monkeypatch.setitem(transfer.SHIFTS, "more-objects", ("2-5 objects", {"max_objects": 5}))
    with pytest.raises(SystemExit, match="not the more-objects shift of today's script; delete"):
        transfer.main(argv)
    with pytest.raises(SystemExit, match="no captioner there"):
        transfer.main(["--out", str(tmp_path / "new"), "--runs", str(tmp_path / "missing")])
    (tmp_path / "cut" / "final").mkdir(parents=True)
    with pytest.raises(SystemExit, match="has not finished"):
        transfer.main(["--out", str(tmp_path / "new"), "--runs", str(tmp_path / "cut")])
    assert not (tmp_path / "new").exists()
    assert not list((out / "worlds").glob("*/retriever.partial"))


def test_the_paper_table_runs_each_arm_per_seed_once_and_tables_their_test_scores(tmp_path, monkeypatch):
    """Each arm's runs train world-paper with the arm's settings and are scored with hard distractors; a re-run
    resumes; the table has one row per arm (mean (range) over seeds) beside the supervised captioner and the demo."""
    paper = script("discritune_paper")
    demo = tmp_path / "demo-s0"
    (demo / "final").mkdir(parents=True)
    (demo / "final_metrics.json").write_text(json.dumps({"p_at_1": 0.6, "rl_seconds": 900.0}))
    calls = []

    def fake_sh(*args, log):
        calls.append(args)
        if args[0] == "train":
            run = Path(args[args.index("--out") + 1])
            run.mkdir(parents=True)
            seed = int(next(a for a in args if a.startswith("seed="))[5:])
            (run / "final_metrics.json").write_text(json.dumps({"p_at_1": 0.5, "rl_seconds": 60.0 + seed}))
        else:
            assert args[args.index("--hard-distractors") + 1] == "10"
            name = Path(args[args.index("--json") + 1]).name
            p1 = 0.4 if name.startswith("supervised") else 0.6 + 0.1 * ("-s1-" in name)
            Path(args[args.index("--json") + 1]).write_text(json.dumps({"p_at_1": p1, "p_at_1_hard10": p1 / 2}))

    monkeypatch.setattr(paper, "sh", fake_sh)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--seeds", "0", "1", "--arms", "paper-greedy", "paper-curriculum",
            "--demo-runs", str(demo)]
    paper.main(argv)
    trains = [a for a in calls if a[0] == "train"]
    assert len(trains) == 4 and len(calls) == 4 + 4 + 2  # + supervised and demo evaluations
    curriculum = next(a for a in trains if "paper-curriculum-s1" in a[a.index("--out") + 1])
    assert "rl.reward.hard_distractors=0" in curriculum
    assert any(a.startswith("rl.reward.curriculum=[") for a in curriculum)
    lines = (out / "paper.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| supervised (shipped)", "| world-paper: greedy rollouts, 10 hard distractors",
        "| world-paper, random -> medium -> hard distractors", "| world-demo (greedy; its select row is the demo)"]
    assert lines[3].split(" | ")[1:4] == ["2", "0.650 (0.600-0.700)", "0.325 (0.300-0.350)"]
    assert lines[3].split(" | ")[-1] == "60 (60-61) |"
    assert lines[5].split(" | ")[-1] == "900 |"  # the demo's RL seconds, read from its own run dir
    assert (out / "paper.png").stat().st_size > 10_000
    calls.clear()
    paper.main(argv)
    assert calls == []


def test_the_variants_table_and_figure_come_from_the_evaluations(tmp_path):
    variants = script("relevance_variants")
    for name, base in (("mlp-tuned", 0.6), ("transformer-frozen", 0.2)):
        for arm, gain in (("sup", 0.0), ("rel", 0.01)):
            (tmp_path / f"{arm}-{name}-test.json").write_text(json.dumps({"bleu4": base + gain, "refcompare": 0.5}))
    (tmp_path / "rel-transformer-frozen").mkdir()
    (tmp_path / "rel-transformer-frozen" / "final_metrics.json").write_text(json.dumps({"rl_seconds": 61.4}))
    (tmp_path / "sup-mlp-frozen-test.json").write_text("{}")  # its second arm not evaluated yet: left out
    variants.main(["--out", str(tmp_path), "--table-only"])
    rows = [line.split(" | ") for line in (tmp_path / "variants.md").read_text().splitlines()[2:]]
    assert [r[:2] for r in rows] == [["| MLP, LM fine-tuned", "supervised"], ["| MLP, LM fine-tuned", "+ CLIP relevance"],
                                     ["| Transformer, LM frozen", "supervised"],
                                     ["| Transformer, LM frozen", "+ CLIP relevance"]]
    assert rows[1][2] == "0.610" and rows[3][-1] == "61 |" and rows[1][-1] == "- |"
    assert (tmp_path / "variants.png").stat().st_size > 10_000
    (tmp_path / "settings.json").write_text(json.dumps({"seed": 0, "config": "world-relevance", "lm_documents": 1}))
    with pytest.raises(SystemExit, match="was made with"):
        variants.main(["--out", str(tmp_path)])  # --lm-documents 3 by default: another LM, refused


def test_the_vlm_table_runs_each_stage_once_and_compares_the_llava_with_clipcap(tmp_path, monkeypatch):
    """reproduce/vlm_world.py: the LLaVA is built, trained and fine-tuned by each method once (a re-run resumes);
    the table holds each captioner's supervised rows once, then each method's rows with its RL seconds, read from
    the run directories."""
    vlm = script("vlm_world")
    calls = []

    def row(captioner, decoding, p1, **extra):
        return {"captioner": captioner, "decoding": decoding, "p_at_1": p1, "wellformed": 1.0, "faithful": 0.8,
                **extra}

    def finished(run, seconds, rows):
        run.mkdir(parents=True)
        (run / "final_metrics.json").write_text(json.dumps({"rl_seconds": seconds, "test_table": {"rows": rows}}))

    def fake_sh(*args, log):
        calls.append(args[:2])
        out = Path(args[args.index("--out") + 1])
        if args[0] == "pretrain":
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"train_images": 800}))
        elif "world-demo" in args:
            finished(out, 600.0, [row("supervised", "greedy", 0.3), row("supervised", "select", 0.5),
                                  row("fine-tuned", "greedy", 0.7), row("fine-tuned", "select", 0.8)])
        else:
            finished(out, 90.0, [row("supervised", "greedy", 0.3, bleu4=0.6), row("fine-tuned", "greedy", 0.35,
                                                                                 bleu4=0.65)])

    def fake_llava(cmd, stdout, stderr):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "raycap_source.json").write_text("{}")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(vlm, "sh", fake_sh)
    monkeypatch.setattr(subprocess, "run", fake_llava)  # what reproduce_common.run_example starts
    clipcap = tmp_path / "clipcap"
    finished(clipcap / "demo", 900.0, [row("supervised", "greedy", 0.39), row("fine-tuned", "greedy", 0.66)])
    finished(clipcap / "rel", 50.0, [row("supervised", "greedy", 0.39, bleu4=0.63),
                                     row("fine-tuned", "greedy", 0.41, bleu4=0.67)])
    argv = ["--out", str(tmp_path / "out"), "--clipcap-discritune", str(clipcap / "demo"),
            "--clipcap-relevance", str(clipcap / "rel")]
    vlm.main(argv)
    assert calls == [("pretrain", "captioner"), ("train", "--config"), ("train", "--config")]
    lines = (tmp_path / "out" / "vlm.md").read_text().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:2] for c in cells] == [
        ["LLaVA (world retriever's tower)", "supervised, greedy"], ["LLaVA (world retriever's tower)",
                                                                    "supervised, select"],
        ["LLaVA (world retriever's tower)", "discritune, greedy"], ["LLaVA (world retriever's tower)",
                                                                    "discritune, select"],
        ["LLaVA (world retriever's tower)", "relevance, greedy"], ["ClipCap", "supervised, greedy"],
        ["ClipCap", "discritune, greedy"], ["ClipCap", "relevance, greedy"]]
    assert cells[2][2] == "0.700" and cells[2][-1] == "600" and cells[0][-1] == "-"
    assert cells[0][2] == "0.300" and cells[0][5] == "0.600"  # the supervised row: the relevance run's BLEU-4 too
    assert cells[4][5] == "0.650" and cells[4][-1] == "90" and cells[2][5] == "-"  # BLEU-4 where it was scored
    assert cells[7][-1] == "50"
    calls.clear()
    vlm.main(argv)
    assert calls == []
