"""Rendezvous ports are bound once: the store that hands out its port already holds it, so no other process on
the node can take the port between choosing and binding it (the race of free_port-then-bind)."""
import socket

import pytest

from raycap.runtime.weights import master_store


def test_the_store_holds_the_port_it_hands_out():
    store = master_store("127.0.0.1", world_size=2)
    assert store.port > 0
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", store.port))
    store.set("k", "v")
    assert store.get("k") == b"v"


def test_an_nccl_broadcast_group_waits_for_a_missing_rank_only_its_timeout(monkeypatch):
    """A rank that never comes (a restarted rollout worker) holds a broadcast for the group's timeout, not NCCL's
    own default of 10 minutes: BroadcastGroup hands its timeout_s to ProcessGroupNCCL as it does to gloo."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from raycap.runtime import weights

    made = []
    monkeypatch.setattr(weights.dist, "ProcessGroupNCCL", lambda *args: made.append(args) or object())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    weights.BroadcastGroup("nccl", "127.0.0.1", 0, 0, 2, timeout_s=7, store=dist.HashStore())
    assert made and made[0][3:] == (timedelta(seconds=7),)
