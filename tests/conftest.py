import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

TINY = ["--set", "n_train=400", "--set", "n_val=120", "--set", "n_test=120", "--set", "labelled_fraction=0.05",
        "--retriever-steps", "4", "--retriever-batch", "32", "--captioner-epochs", "1", "--threads", "2"]


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory):
    """A pretrained world built by `python -m raycap.pretrain` on a tiny world (seconds, untrained models)."""
    from raycap.pretrain import main

    out = tmp_path_factory.mktemp("pretrain") / "world"
    main(["world", "--out", str(out), *TINY])
    return out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAYCAP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
