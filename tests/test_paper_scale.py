"""The `coco-clipcap` config at the paper's architecture sizes, end to end on CPU (issue 27): a Karpathy-format
subset of the exported world (300 train / 100 val / 100 test images), a random-weight CLIP ViT-B/32 checkpoint file
as the retriever, a GPT-2 124M (random weights) with a locally trained BPE as the captioner's LM. `pretrain
captioner` for a few steps, 1 RL update on the local runtime with the config's own batch (100 images, 100
candidates, 40 tokens) and its beam-5 test evaluation (on the subset's 100 test images), 2 on the Ray runtime
(10 images per update, to keep CI's time; the second rollout uses the synced weights), then `evaluate` with
`select`, `caption`, and `report` of the Ray run. What a CPU user must change in `coco-clipcap` is refused with one
line that says so (its GPU counts), or automatic (the device and precision of every role)."""
import json

import numpy as np
import pytest
import torch

from raycap.config import load_config

pytestmark = pytest.mark.paper_scale

N = {"train": 300, "val": 100, "test": 100}
VOCAB = 50257  # GPT-2's


def gpt2_bpe(texts):
    """A byte-level BPE with GPT-2's 50,257 ids: the world's references and enough random words for the merges."""
    from raycap.models.bpe import train_bpe

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(20000)]
    corpus = list(texts) + [" ".join(rng.choice(words, size=12)) for _ in range(20000)]
    tok = train_bpe(corpus, vocab_size=VOCAB)
    assert len(tok) == VOCAB
    return tok


@pytest.fixture(scope="module")
def paper_inputs(tmp_path_factory):
    """(Karpathy subset JSON, random ViT-B/32 checkpoint file, GPT-2 124M dir, its tokenizer dir)."""
    import open_clip
    from transformers import GPT2Config, GPT2LMHeadModel

    from raycap.data.export import export_world

    root = tmp_path_factory.mktemp("paper")
    export_world(root / "world", max_train=N["train"], show_progress=False)
    data = json.loads((root / "world" / "dataset_world.json").read_text())
    kept, seen = [], {s: 0 for s in N}
    for image in data["images"]:
        if seen[image["split"]] < N[image["split"]]:
            seen[image["split"]] += 1
            kept.append(image)
    subset = root / "world" / "subset.json"
    subset.write_text(json.dumps(data | {"images": kept}))
    torch.manual_seed(0)
    vit = root / "vit-b-32-random.pt"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), vit)
    tok = gpt2_bpe(s["raw"] for image in kept for s in image["sentences"])
    tok.save_pretrained(str(root / "tokenizer"))
    GPT2LMHeadModel(GPT2Config(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(
        root / "gpt2-124m")
    return subset, vit, root / "gpt2-124m", root / "tokenizer"


def test_coco_clipcap_end_to_end_at_paper_size(paper_inputs, tmp_path, capsys):
    from raycap.caption import main as caption_main
    from raycap.evaluate import main as evaluate_main
    from raycap.pretrain import main as pretrain_main
    from raycap.report.__main__ import main as report_main
    from raycap.train import main as train_main

    subset, vit, lm, tok = paper_inputs
    image_root = subset.parent
    stage = tmp_path / "stage.yaml"
    stage.write_text(json.dumps({
        "threads": 2, "eval_images": 100,
        "data": {"kind": "karpathy", "path": str(subset), "splits": {"train": "train", "val": "val", "test": "test"},
                 "train_images": 20},
        "retriever": {"name": "ViT-B-32", "pretrained": str(vit)},
        "model": {"kind": "clipcap", "lm": str(lm), "tokenizer": str(tok), "prefix_length": 10},
        "training": {"epochs": 1, "batch_size": 100, "lr": 1e-3, "warmup_steps": 1, "max_new_tokens": 40,
                     "val_images": 20}}))
    pretrain_main(["captioner", "--config", str(stage), "--out", str(tmp_path / "pre")])
    captioner = tmp_path / "pre" / "captioner"

    cfg = load_config("coco-clipcap")
    assert (cfg.rl.batch_size, cfg.rl.reward.num_candidates, cfg.rl.sampling.max_new_tokens, cfg.eval.decoding,
            cfg.eval.num_beams) == (100, 100, 40, "beam", 5)  # the local run's test evaluation: beam 5
    common = ["--config", "coco-clipcap", "--set", f"data.path={subset}", "--set", f"data.image_root={image_root}",
              "--set", f"retriever.pretrained={vit}", "--set", f"captioner.path={captioner}",
              "--set", "checkpoint_every=2", "--set", "eval.images=100", "--set", "threads=2",
              "--set", "data.train_images=100",  # the supervised stage's images: their embeddings are cached
              "--set", "eval.report=false", "--set", "eval.test_table=false"]  # report_main below compares
    for runtime, steps in (("local", 1), ("ray", 2)):
        extra = ["--set", f"rl.steps={steps}"]
        if runtime == "ray":
            # coco-clipcap reserves a GPU for its learner and reward service: on a machine without one, one line
            # says what to set
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                train_main([*common, "--out", str(tmp_path / "refused"), "--runtime", "ray",
                            "--set", "runtime.num_cpus=8"])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and len(err.splitlines()) == 1, err  # before Ray or any actor starts
            assert "gpus_per_learner 0.5, gpus_per_reward 0.5 but this machine has no GPU" in err, err
            # the distributed path at the same architecture; 10 images per update and a greedy test evaluation
            # keep CI's time (the local run above took the config's batch of 100 and its beam-5 evaluation)
            extra += ["--set", "runtime.gpus_per_learner=0", "--set", "runtime.gpus_per_reward=0",
                      "--set", "runtime.num_cpus=8", "--set", "threads=1",
                      "--set", "rl.batch_size=10", "--set", "rl.reward.num_candidates=10",
                      "--set", "eval.decoding=greedy"]
        final = train_main([*common, *extra, "--out", str(tmp_path / runtime), "--runtime", runtime])
        assert final["updates"] == steps and final["n_images"] == 100 and 0 <= final["p_at_1"] <= 1
        records = [json.loads(line) for line in (tmp_path / runtime / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in records if "loss" in r]) == steps
        assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    run = tmp_path / "local"

    retriever = ["--retriever-name", "ViT-B-32", "--pretrained", str(vit)]
    dataset = f"karpathy:{subset}:test"
    # greedy decoding at this size ran in both runs' evaluations, beam 5 in the local run's test evaluation
    few = tmp_path / "select.yaml"  # the select decoding's settings, with 2 samples per image instead of 16
    few.write_text("eval: {select_samples: 2}\n")
    select = evaluate_main(["--captioner", str(run / "final"), "--dataset", dataset, *retriever,
                            "--decoding", "select", "--select-config", str(few),
                            "--pool", f"karpathy:{subset}:train"])
    assert select["n_images"] == 100
    images = sorted((image_root / "images" / "test").glob("*.png"))[:3]
    captions = caption_main([*map(str, images), "--captioner", str(run / "final"), *retriever])
    assert len(captions) == 3 and all(isinstance(c["caption"], str) for c in captions)
    page = report_main([str(tmp_path / "ray"), "--gallery", "8"])  # greedy: the local run's beam 5 ran once
    assert page.is_file() and page.stat().st_size > 1000
