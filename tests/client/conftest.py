"""Fixtures of the client tier."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def free_address() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"
