"""Bad input tried as a new user would: each gives one line naming the culprit (exit 2 from a CLI), before any
heavy work, and loses nothing."""
import json
import re
import shutil

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from raycap.config import RuntimeConfig, load_config
from raycap.data.world import WorldConfig
from raycap.errors import UserError
from raycap.models.clip import Retriever
from raycap.models.clipcap import ClipCap, ClipCapConfig
from raycap.runlog import RunLog, prepare_run_dir

from cli_checks import exits_2

LM = dict(vocab_size=30, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- 1. truncated / unsafe weights ------------------------------------------------------------------------------


@pytest.fixture
def captioner_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "cap"
    ClipCap(ClipCapConfig(clip_dim=8, prefix_length=2, lm=dict(LM))).save_pretrained(d)
    return d


def test_truncated_retriever_weights_name_the_file(tmp_path):
    from raycap.models.tokenizers import world_tokenizer

    d = tmp_path / "retriever"
    Retriever.for_world(world_tokenizer(["a", "red", "circle"])).save_pretrained(d)
    truncate(d / "model.safetensors")
    with pytest.raises(UserError, match=re.escape(f"{d / 'model.safetensors'}: cannot read weights (truncated "
                                                  "or corrupt safetensors file")) as e:
        Retriever.from_pretrained(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["lm/model.safetensors", "mapper.safetensors"])
def test_truncated_captioner_weights_name_the_file(captioner_dir, name):
    truncate(captioner_dir / name)
    with pytest.raises(UserError, match=re.escape(f"{captioner_dir / name}: cannot read weights (truncated")):
        ClipCap.from_pretrained(captioner_dir)


def test_captioner_lm_loads_from_safetensors_only(captioner_dir):
    lm_dir = captioner_dir / "lm"
    torch.manual_seed(0)
    torch.save(GPT2LMHeadModel(GPT2Config(**LM)).state_dict(), lm_dir / "pytorch_model.bin")  # pickled weights
    for f in lm_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match=r"missing LM weights in lm/ \(\*\.safetensors\): pickled \*\.bin"):
        ClipCap.from_pretrained(captioner_dir)


def test_evaluate_with_a_truncated_captioner_is_one_line(tiny_world_dir, tmp_path, capsys):
    from raycap.evaluate import main

    cap = tmp_path / "cap"
    shutil.copytree(tiny_world_dir / "captioner", cap)
    truncate(cap / "lm" / "model.safetensors")
    msg = exits_2(main, ["--captioner", str(cap), "--world-dir", str(tiny_world_dir)], capsys)
    assert f"{cap / 'lm' / 'model.safetensors'}: cannot read weights" in msg


# -- 2. a torn metrics.jsonl ------------------------------------------------------------------------------------


def records(n):
    return [json.dumps({"step": i, "loss": 0.5 / (i + 1)}) for i in range(n)]


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n".join(records(4)) + '\n{"step": 4, "lo')
    log = RunLog(tmp_path, step=3)
    log.write({"step": 4, "loss": 0.1})
    log.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "warning:" in err and "metrics.jsonl" in err and "torn last line 5" in err


def test_torn_middle_metrics_line_is_refused_naming_the_line(tmp_path):
    lines = records(4)
    lines[1] = lines[1][:9]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'metrics.jsonl'}: line 2 is not a valid JSON")):
        RunLog(tmp_path, step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost


def test_prepare_run_dir_checks_the_metrics_before_anything_loads(tmp_path, capsys):
    config = load_config("world-demo", ["rl.steps=4"])
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "config.json").write_text(config.model_dump_json())
    lines = records(3)
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[2] + "\n")
    with pytest.raises(UserError, match="line 2 is not a valid JSON record"):
        prepare_run_dir(tmp_path, config, "local")
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3')
    prepare_run_dir(tmp_path, config, "local")
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(line + "\n" for line in lines)
    assert "torn last line 4" in capsys.readouterr().err


# -- 3. paths and arguments checked first --------------------------------------------------------------------------


def test_train_out_that_is_a_file_or_unwritable(tmp_path, capsys, no_heavy_work):
    from raycap.train import main

    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert exits_2(main, ["--out", str(f)], capsys) == f"error: --out {f}: exists and is not a directory"
    assert "is a file, not a directory" in exits_2(main, ["--out", str(f / "run")], capsys)
    assert f.read_text() == "keep me"
    if (proc := __import__("pathlib").Path("/proc")).is_dir():  # not writable, even for root
        assert "not writable" in exits_2(main, ["--out", str(proc / "raycap-run")], capsys)


@pytest.mark.parametrize("args, needle", [
    (["--images", "50"], "--images 50: P@1 ranks each target among 100 candidates"),
    (["--images", "-5"], "--images -5:"),
    (["--num-beams", "0", "--decoding", "beam"], "--num-beams 0: must be >= 1"),
])
def test_evaluate_bad_numbers_are_one_line(tmp_path, capsys, no_heavy_work, args, needle):
    from raycap.evaluate import main

    msg = exits_2(main, ["--captioner", str(tmp_path), *args], capsys)
    assert needle in msg


def test_evaluate_json_is_checked_before_the_evaluation(tmp_path, capsys, no_heavy_work):
    from raycap.evaluate import main

    msg = exits_2(main, ["--captioner", str(tmp_path), "--json", str(tmp_path)], capsys)
    assert msg == f"error: --json {tmp_path}: is a directory; give a file path such as {tmp_path / 'metrics.json'}"
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is a file, not a directory" in exits_2(
        main, ["--captioner", str(tmp_path), "--json", str(blocker / "m.json")], capsys)


def test_pretrain_world_config_that_is_a_list(tmp_path, capsys):
    from raycap.pretrain import main

    cfg = tmp_path / "world.yaml"
    cfg.write_text("- n_train: 10\n- n_val: 5\n")
    msg = exits_2(main, ["world", "--out", str(tmp_path / "w"), "--world-config", str(cfg)], capsys)
    assert msg.startswith(f"error: {cfg}: a world config must be a mapping") and msg.endswith("not a list")
    assert not (tmp_path / "w").exists()


# -- 4. config values, keys and YAML ------------------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("rl.optimiser.lr=.inf", "rl.optimiser.lr"), ("rl.optimiser.lr=.nan", "rl.optimiser.lr"),
    ("rl.algorithm.kl_coef=.inf", "rl.algorithm.kl_coef"),
    ("rl.sampling.temperature=-.inf", "rl.sampling.temperature"),
    ("runtime.placement_timeout_s=.inf", "runtime.placement_timeout_s"), ("runtime.cpus_per_learner=.nan",
                                                                           "runtime.cpus_per_learner"),
])
def test_every_float_must_be_finite(override, field):
    with pytest.raises(UserError, match=re.escape(f"--set {field}: Input should be a finite number")):
        load_config("world-demo", [override])


def test_every_config_model_refuses_inf_and_nan():
    for model, field in ((RuntimeConfig, "placement_timeout_s"), (WorldConfig, "noise")):
        for value in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match="finite"):
                model.model_validate({field: value})


def test_bad_set_key_names_the_set_and_lists_the_section_keys():
    with pytest.raises(UserError) as e:
        load_config("world-demo", ["bogus=1"])
    msg = str(e.value)
    assert msg.startswith("--set bogus: unknown key 'bogus'") and "valid keys: " in msg and " rl," in msg
    assert "site-packages" not in msg and "world-demo.yaml" not in msg
    with pytest.raises(UserError) as e:
        load_config("world-demo", ["runtime.bogus=1"])
    msg = str(e.value)
    assert msg.startswith("--set runtime.bogus: unknown key 'bogus' in section 'runtime'")
    assert "dashboard_port" in msg and " lr," not in msg
    with pytest.raises(UserError,
                       match=re.escape("--set rl.optimiser.lr.x: 'rl.optimiser.lr' is a setting, not a section")):
        load_config("world-demo", ["rl.optimiser.lr.x=1"])


def test_yaml_syntax_errors_keep_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlr: [1\nkl_coef: 2\n")
    with pytest.raises(UserError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert msg.startswith(f"{bad}: invalid YAML: line 3, column 8:") and "line 2, column 5" in msg
    assert "\n" not in msg
    yaml.safe_load("a: 1")  # the module still works (no state left behind)
