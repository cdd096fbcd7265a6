"""What a researcher reaches for first: the `raycap` console command, the Python API (`raycap.train`,
`raycap.evaluate`, `raycap.load_captioner`), and captions written in COCO results format."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from world_runs import FAST, world_sets


def console(*args, check=True):
    script = Path(sys.executable).parent / "raycap"  # installed by `pip install .` ([project.scripts])
    assert script.is_file(), f"{script}: the console command is not installed"
    return subprocess.run([str(script), *args], capture_output=True, text=True, check=check, timeout=120)


def test_console_command_lists_every_entry_point_and_passes_arguments_through():
    from raycap.commands import COMMANDS

    top = console("--help").stdout
    for name in ("train", "tune", "evaluate", "caption", "report", "pretrain", "convert", "data"):
        assert name in COMMANDS and f"    {name}" in top, name
    for name in COMMANDS:
        assert console(name, "--help").stdout.startswith(f"usage: raycap {name}"), name
    assert "world-demo" in console("train", "--list-configs").stdout.split()
    bad = console("nonsense", check=False)
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr
    wrong = console("evaluate", "--captioner", "/nonexistent", "--dataset", "world:test", check=False)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "error: --captioner /nonexistent: no such directory"
    # the module form stays, under its own name
    module = subprocess.run([sys.executable, "-m", "raycap.train", "--help"], capture_output=True, text=True,
                            check=True, timeout=120)
    assert module.stdout.startswith("usage: python -m raycap.train")


def test_importing_raycap_starts_nothing_heavy():
    code = ("import sys, raycap; heavy = [m for m in ('torch', 'ray', 'transformers', 'open_clip') if m in "
            "sys.modules]; assert not heavy, heavy; assert callable(raycap.train) and callable(raycap.evaluate); "
            "assert not [m for m in ('torch', 'ray') if m in sys.modules]; print(sorted(raycap.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "load_captioner" in out.stdout


def test_python_api_trains_evaluates_and_captions(tiny_world_dir, tmp_path):
    """raycap.train returns the run (dir, final metrics, captioner); the run's final_captions.json is COCO results
    format and raycap.evaluate of it gives the run's own test metrics; load_captioner captions PIL images and
    paths as `raycap caption` does."""
    import numpy as np
    from PIL import Image

    import raycap
    from raycap.errors import UserError
    from raycap.inputs import load_world

    sets = dict(s.split("=", 1) for s in world_sets(tiny_world_dir))
    fast = dict(FAST[i + 1].split("=", 1) for i in range(0, len(FAST), 2))
    fast.pop("eval.select_samples")  # the shipped 64: with 4, the tiny world's captioner can select an empty caption
    overrides = {k: json.loads(v) if v[:1].isdigit() or v in ("false", "true") else v
                 for k, v in (sets | fast).items()} | {"rl.steps": 2}
    run = raycap.train("world-demo", out=tmp_path / "run", overrides=overrides, runtime="local")
    assert run.dir == tmp_path / "run" and run.metrics["updates"] == 2 and run.config.rl.steps == 2
    assert json.loads((run.dir / "final_metrics.json").read_text())["p_at_1"] == run.metrics["p_at_1"]
    entries = json.loads((run.dir / "final_captions.json").read_text())
    assert [e["image_id"] for e in entries] == [f"test-{i}" for i in range(100)]
    assert all(isinstance(e["caption"], str) and e["caption"] for e in entries)

    given = raycap.evaluate(captions=run.dir / "final_captions.json", dataset="world:test",
                            world_dir=tiny_world_dir, images=100, hard_distractors=[])
    for key in ("p_at_1", "wellformed", "faithful", "unique_caption_ratio"):
        assert given[key] == pytest.approx(run.metrics[key], abs=1e-9, nan_ok=True), key
    with pytest.raises(UserError, match="unknown option 'beams'"):
        raycap.evaluate(captioner=run.dir / "final", beams=3)

    world = load_world(tiny_world_dir)
    pictures = [Image.fromarray(np.asarray(world.image("test", i))) for i in range(3)]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(tmp_path / f"img{i}.png")
        picture.save(paths[-1])
    captioner = run.captioner
    mixed = captioner.caption([pictures[0], str(paths[1]), paths[2]])
    listed = console("caption", "--captioner", str(run.dir / "final"), "--retriever",
                     str(tiny_world_dir / "retriever"), "--json", *map(str, paths)).stdout
    assert mixed == [r["caption"] for r in json.loads(listed)]
    assert raycap.load_captioner(run.dir / "final", retriever=tiny_world_dir / "retriever").caption(
        pictures[:1], decoding="beam", num_beams=2)[0]
    with pytest.raises(UserError, match="no such directory"):
        raycap.load_captioner(tmp_path / "missing")


def test_saved_captions_score_as_the_captioner_does(tiny_world_dir, tmp_path, capsys):
    """`evaluate --save-captions` writes COCO results; `--captions` of that file gives the captioner's metrics."""
    from raycap.evaluate import main as evaluate_main

    common = ["--world-dir", str(tiny_world_dir), "--images", "100", "--dataset", "world:val"]
    saved = tmp_path / "out" / "results.json"
    direct = evaluate_main(["--captioner", str(tiny_world_dir / "captioner"), *common, "--save-captions", str(saved)])
    assert "COCO results format" in capsys.readouterr().out
    entries = json.loads(saved.read_text())
    assert len(entries) == 100 and set(entries[0]) == {"image_id", "caption"} and entries[0]["image_id"] == "val-0"
    again = evaluate_main(["--captions", str(saved), *common])
    for key in ("p_at_1", "p_at_1_hard5", "bleu4", "cider", "meteor", "clipscore", "refcompare", "faithful",
                "distinct_2"):
        assert again[key] == pytest.approx(direct[key], abs=1e-9, nan_ok=True), key


def test_coco_results_keep_integer_ids():
    from raycap.metrics.results import coco_results

    assert coco_results(["391895", "test-3", "images/a.jpg"], ["a", "b", "c"]) == [
        {"image_id": 391895, "caption": "a"}, {"image_id": "test-3", "caption": "b"},
        {"image_id": "images/a.jpg", "caption": "c"}]
    with pytest.raises(ValueError):
        coco_results(["1"], [])
