"""The sectioned run config: sections, overrides, named configs and one-line errors."""
import json
import re

import pytest
import yaml

from raycap.config import WORLD_DIR, RunConfig, load_config, named_configs
from raycap.errors import UserError


def test_named_configs_load_with_their_sections():
    assert {"world-demo", "world-files", "world-gpu"} <= set(named_configs())
    demo = load_config("world-demo")
    assert demo.data.kind == "world" and demo.data.splits == {"train": "train", "val": "val", "test": "test"}
    assert demo.retriever.path == str(WORLD_DIR / "retriever")
    assert demo.rl.reward.kind == "pool" and demo.eval.decoding == "select"
    files = load_config("world-files")
    assert files.data.kind == "karpathy" and files.retriever.path == "world-files/retriever"
    # world-files runs what world-demo runs, only from files
    assert files.rl == demo.rl and files.eval == demo.eval and files.seed == demo.seed


def test_set_overrides_a_field_of_a_section():
    cfg = load_config("world-demo", ["rl.algorithm.kl_coef=0.3", "eval.every=10", "data.on_bad_image=skip", "seed=4"])
    assert (cfg.rl.algorithm.kl_coef, cfg.eval.every, cfg.data.on_bad_image, cfg.seed) == (0.3, 10, "skip", 4)


@pytest.mark.parametrize("key, hint", [("kl_coef=0.3", "now rl.algorithm.kl_coef"), ("eval_every=5", "now eval.every"),
                                       ("world_dir=x", "data.path, retriever.path and captioner.path")])
def test_a_flat_key_of_the_old_config_names_its_new_place(key, hint):
    with pytest.raises(UserError) as e:
        load_config("world-demo", [key])
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_a_flat_yaml_file_names_the_section_to_use(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("kl_coef: 0.3\nsteps: 10\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and "now rl.algorithm.kl_coef" in str(e.value)


@pytest.mark.parametrize("data, words", [
    ({"kind": "coco", "path": "x"}, ["data.splits", "coco"]),
    ({"kind": "karpathy"}, ["data.path", "karpathy"]),
    ({"kind": "karpathy", "path": "d.json", "splits": {"train": "train", "val": "val"}}, ["missing test"]),
    ({"kind": "imagenet"}, ["kind", "imagenet"]),
    ({"on_bad_image": "ignore"}, ["on_bad_image"]),
])
def test_bad_data_sections_are_one_line(tmp_path, data, words):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(UserError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_retriever_section_takes_a_name_or_a_path():
    assert RunConfig.model_validate({"retriever": {"name": "ViT-B-32", "pretrained": "openai"}}).retriever.path is None
    with pytest.raises(ValueError, match="not both"):
        RunConfig.model_validate({"retriever": {"name": "ViT-B-32", "path": "x"}})
    with pytest.raises(ValueError, match="needs retriever.name"):
        RunConfig.model_validate({"retriever": {"pretrained": "openai"}})


def test_cross_section_checks_name_both_fields():
    with pytest.raises(UserError, match="runtime.learner_workers .3. must divide rl.batch_size .32."):
        load_config("world-demo", ["runtime.learner_workers=3"])


def test_a_captioner_for_another_embedding_width_is_one_line(tmp_path, capsys):
    """ViT-B-32 (random weights, nothing downloaded) gives 512-d embeddings; the world captioner reads 128-d."""
    from raycap.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "world-demo", "--runtime", "local", "--out", str(tmp_path / "r"),
              "--set", "retriever.name=ViT-B-32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "reads 128-d image embeddings but the retriever ViT-B-32 (None) gives 512-d" in err


@pytest.mark.parametrize("overrides, words", [
    (["runtime.weight_sync=nccl"], "needs GPUs on the learner and the rollouts"),
    (["runtime.weight_sync=nccl", "runtime.gpus_per_learner=1"], "gpus_per_rollout 0"),
    (["runtime.learner_workers=2", "runtime.gpus_per_learner=0.5", "rl.batch_size=64"], "its own GPU"),
    (["runtime.weight_sync=nccl", "runtime.gpus_per_learner=0.5", "runtime.gpus_per_rollout=0.5"],
     r"weight_sync 'nccl' over collective_backend 'nccl' .* whole number >= 1 of them \(gpus_per_learner 0.5, "
     r"gpus_per_rollout 0.5\): Ray would pack"),
    (["runtime.weight_sync=nccl", "runtime.gpus_per_learner=1", "runtime.gpus_per_rollout=1.5"],
     r"\(gpus_per_rollout 1.5\)"),
])
def test_collectives_without_their_gpus_are_refused_before_any_actor(overrides, words):
    with pytest.raises(UserError, match=words) as e:
        load_config("world-demo", overrides)
    assert "\n" not in str(e.value)


def test_collectives_that_fit_load():
    load_config("world-demo", ["runtime.weight_sync=nccl", "runtime.collective_backend=gloo"])
    load_config("world-demo", ["runtime.learner_workers=2", "runtime.gpus_per_learner=1", "rl.batch_size=64"])
    load_config("world-gpu")
    load_config("world-demo", ["runtime.weight_sync=nccl", "runtime.collective_backend=gloo",
                               "runtime.gpus_per_learner=0.5", "runtime.gpus_per_rollout=0.5"])  # gloo shares one


@pytest.mark.parametrize("baseline", ["loo", "best", "greedy"])
def test_a_per_image_baseline_with_greedy_rollouts_is_refused(baseline):
    """n greedy captions of an image are one caption: baselines that compare an image's own captions would make
    every advantage 0 and train silently on nothing."""
    with pytest.raises(UserError, match=f"baseline '{baseline}' with sampling.rollout 'greedy'.*every advantage is 0"):
        load_config("world-demo", ["rl.sampling.rollout=greedy", f"rl.algorithm.baseline={baseline}",
                                   "rl.sampling.num_samples=2"])
    load_config("world-demo", ["rl.sampling.rollout=greedy", "rl.algorithm.baseline=mean"])


def test_a_contradiction_made_by_set_names_the_set_not_the_shipped_yaml():
    with pytest.raises(UserError) as e:
        load_config("world-demo", ["rl.sampling.num_samples=1"])  # world-demo's baseline is best
    msg = str(e.value)
    assert msg.startswith("--set rl.sampling.num_samples=1: rl: ") and "needs sampling.num_samples >= 2" in msg
    assert "world-demo.yaml" not in msg and "\n" not in msg
    with pytest.raises(UserError) as e:  # a cross-section check, fed by a runtime --set
        load_config("world-demo", ["runtime.learner_workers=5"])
    assert str(e.value).startswith("--set runtime.learner_workers=5: <root>: ")


def test_a_contradiction_inside_the_file_still_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: {algorithm: {baseline: best}, sampling: {num_samples: 1}}\n")
    with pytest.raises(UserError, match=r"bad\.yaml: rl: .*needs sampling\.num_samples >= 2"):
        load_config(str(bad), ["eval.every=10"])


def test_every_flat_rl_key_is_refused_with_its_section(tmp_path):
    """The rl section before its sub-sections: each flat key, in a file or by `--set`, is one line naming where it
    lives now, and that place is a real setting."""
    from raycap.config import RL_MOVED, RL_SECTIONS

    assert len(RL_MOVED) == 26  # every field of the flat section but method, steps and batch_size
    for old, new in RL_MOVED.items():
        section, field = new.split(".")
        assert field in RL_SECTIONS[section].model_fields
        value = RL_SECTIONS[section]().model_dump(mode="json")[field]
        path = tmp_path / f"{old}.yaml"
        path.write_text(yaml.safe_dump({"rl": {old: value}}))
        with pytest.raises(UserError) as e:
            load_config(str(path))
        assert str(e.value) == f"{path}: rl: Value error, rl.{old} is now rl.{new}"
        if old != "reward":  # rl.reward is the reward section now: `--set rl.reward=pool` is refused by the model
            with pytest.raises(UserError, match=re.escape(f"--set rl.{old}: unknown key {old!r} in section 'rl' "
                                                          f"(now rl.{new})")):
                load_config("world-demo", [f"rl.{old}={json.dumps(value)}"])
    with pytest.raises(UserError, match=re.escape("--set rl.reward=pool: rl: Value error, rl.reward is now "
                                                  "rl.reward.kind")):
        load_config("world-demo", ["rl.reward=pool"])
    cfg = load_config("world-demo", ["rl.reward.kind=discriminative", "rl.algorithm.kl_coef=0.2",
                                     "rl.optimiser.lr=1e-4", "rl.sampling.num_samples=4", "rl.self_check.coef=1"])
    assert (cfg.rl.reward.kind, cfg.rl.algorithm.kl_coef, cfg.rl.optimiser.lr, cfg.rl.sampling.num_samples,
            cfg.rl.self_check.coef) == ("discriminative", 0.2, 1e-4, 4, 1.0)
