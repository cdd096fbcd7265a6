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
