import json
import subprocess
import sys

import pytest
from conftest import TINY

from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap
from raycap.pretrain import main


@pytest.fixture(scope="module")
def run_dir(tiny_world_dir):
    return tiny_world_dir


def test_pretrain_writes_checkpoints_and_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("p_at_1_full", "p_at_1_vague", "binding_accuracy"):
        assert 0.0 <= metrics["retriever"][key] <= 1.0
    for key in ("p_at_1", "wellformed", "faithful", "precision", "recall", "multi_object", "repetition"):
        assert key in metrics["captioner"]
    retriever = Retriever.from_pretrained(run_dir / "retriever")
    captioner = ClipCap.from_pretrained(run_dir / "captioner")
    assert captioner.config.clip_dim == retriever.embed_dim
    assert json.loads((run_dir / "world.json").read_text())["n_train"] == 400
    assert (run_dir / "work" / "retriever" / "state.pt").exists()


def test_pretrain_resumes_instead_of_redoing_finished_stages(run_dir, capsys):
    before = (run_dir / "retriever" / "model.safetensors").stat().st_mtime_ns
    main(["world", "--out", str(run_dir), *TINY])
    assert (run_dir / "retriever" / "model.safetensors").stat().st_mtime_ns == before
    assert "retriever (test)" not in capsys.readouterr().out


def test_interrupted_retriever_training_resumes_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "w"
    main(["world", "--out", str(out), "--stages", "retriever", *TINY])
    # pretend the run was cut off after its last checkpoint: drop the final checkpoint dir, ask for more steps
    import shutil
    shutil.rmtree(out / "retriever")
    steps = TINY.index("--retriever-steps") + 1
    longer = TINY[:steps] + ["6"] + TINY[steps + 1:]
    main(["world", "--out", str(out), "--stages", "retriever", *longer])
    assert "resuming from step 4" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "work" / "retriever" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 6]


def test_world_config_mismatch_with_an_existing_run_dir_is_refused(run_dir):
    with pytest.raises(SystemExit) as e:
        main(["world", "--out", str(run_dir), *TINY, "--set", "noise=3"])
    assert e.value.code == 2


@pytest.mark.parametrize("extra,needle", [
    (["--set", "image_size=-4"], "image_size"),
    (["--set", "shapes=[circle, blob]"], "blob"),
    (["--set", "labelled_fraction=1.5"], "labelled_fraction"),
    (["--retriever-steps", "0"], "--retriever-steps"),
    (["--stages", "retriever,rl"], "'rl'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        main(["world", "--out", str(tmp_path / "x"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_entry_point_bad_value_and_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raycap.pretrain", "world", "--out", str(tmp_path / "x"),
                        "--set", "colours=[red, mauve]"], capture_output=True, text=True)
    assert r.returncode == 2 and "mauve" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "raycap.pretrain", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--retriever-steps" in r.stdout


def test_a_missing_retriever_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["world", "--out", str(tmp_path / "x"), "--retriever", str(tmp_path / "nope"), *TINY])
    assert "missing raycap_retriever.json" in capsys.readouterr().err


def test_retriever_init_trains_on_from_the_given_weights(run_dir, tmp_path):
    """--retriever-init starts from a trained retriever: with a vanishing learning rate the result is that
    retriever (random initial weights would not be)."""
    import torch

    from raycap.models.safetensors_io import load_weights

    out = tmp_path / "r2"
    main(["world", "--out", str(out), "--stages", "retriever", "--retriever-init", str(run_dir / "retriever"),
          "--retriever-lr", "1e-12", "--seed", "1", *TINY])
    init = load_weights(run_dir / "retriever" / "model.safetensors")
    trained_on = load_weights(out / "retriever" / "model.safetensors")
    assert init.keys() == trained_on.keys()
    assert all(torch.allclose(init[k], trained_on[k], atol=1e-6) for k in init)
    assert json.loads((out / "metrics.json").read_text())["retriever"]["init"] == str(run_dir / "retriever")


def test_retriever_and_retriever_init_together_are_refused(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["world", "--out", str(tmp_path / "x"), "--retriever", str(run_dir / "retriever"),
              "--retriever-init", str(run_dir / "retriever"), *TINY])
    assert e.value.code == 2 and "--retriever-init" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused with the other flag checks, before the run dir is made
