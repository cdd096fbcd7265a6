"""Weight broadcast over NCCL (`runtime.weight_sync: nccl`, `raycap.runtime.weights.BroadcastGroup`), on CUDA only
(run by benchmarks/gpu_check.sh through `pytest -m cuda`; the same broadcast over gloo is tested on CPU).

- one GPU: a group of rank 0 alone forms over NCCL and its broadcast runs and keeps every tensor, for a model on
  the GPU and for one on the CPU (staged through the GPU and copied back);
- two GPUs: rank 0's trainable weights reach rank 1's model (two processes, torch.multiprocessing spawn), and a
  frozen parameter is not sent."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from raycap.runtime.weights import BroadcastGroup, master_store

HOST = "127.0.0.1"
TIMEOUT_S = 60

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="torch built without NCCL"),
]


def make_model(seed: int) -> torch.nn.Module:
    """Two layers, the second frozen (a broadcast moves trainable tensors only)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model[2].requires_grad_(False)
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def shutdown(group: BroadcastGroup) -> None:
    if hasattr(group.group, "shutdown"):  # a group made outside init_process_group is not destroyed for us
        group.group.shutdown()


@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_nccl_group_of_one_rank_broadcasts_and_keeps_the_weights(where):
    torch.cuda.set_device(0)
    store = master_store(HOST, world_size=1, timeout_s=TIMEOUT_S)
    group = BroadcastGroup("nccl", HOST, store.port, rank=0, world_size=1, timeout_s=TIMEOUT_S, store=store)
    try:
        assert group.device == torch.device("cuda", 0)
        model = make_model(0).to(where)
        before = state(model)
        seconds = group.broadcast(model)
        torch.cuda.synchronize()
        assert seconds >= 0
        after = state(model)
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert all(p.device.type == where for p in model.parameters())  # staged copies go back where they were
    finally:
        shutdown(group)


def _two_ranks(rank: int, port_file: str) -> None:
    """One process of the 2-rank test (module level: torch.multiprocessing spawn pickles it by name)."""
    torch.cuda.set_device(rank)
    path = Path(port_file)
    if rank == 0:
        store = master_store(HOST, world_size=2, timeout_s=TIMEOUT_S)
        path.write_text(str(store.port))
        group = BroadcastGroup("nccl", HOST, store.port, rank=0, world_size=2, timeout_s=TIMEOUT_S, store=store)
    else:
        deadline = time.monotonic() + TIMEOUT_S
        while not path.exists() or not path.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 never wrote its store's port")
            time.sleep(0.05)
        port = int(path.read_text())
        group = BroadcastGroup("nccl", HOST, port, rank=1, world_size=2, timeout_s=TIMEOUT_S)
    try:
        model = make_model(seed=rank).cuda(rank)  # different weights on each rank before the broadcast
        group.broadcast(model)
        torch.cuda.synchronize()
        if rank == 1:
            sent, own = state(make_model(seed=0)), state(make_model(seed=1))
            got = state(model)
            for k in ("0.weight", "0.bias"):  # trainable: rank 0's values
                assert torch.equal(got[k], sent[k]), k
                assert not torch.equal(got[k], own[k]), k
            for k in ("2.weight", "2.bias"):  # frozen: not sent, rank 1's own values
                assert torch.equal(got[k], own[k]), k
            group.store.set("checked", "1")
        else:
            group.store.wait(["checked"])  # rank 0 keeps its store up until rank 1 has checked
    finally:
        shutdown(group)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-rank NCCL broadcast needs two GPUs")
def test_nccl_broadcast_sends_rank_0s_trainable_weights_to_rank_1(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "port"),), nprocs=2, join=True)
