"""Fixtures of the client tier."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.proxy import Proxy


@pytest.fixture
def free_address() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def proxies(sidecar) -> Iterator[Callable[..., Proxy]]:
    """Makes proxies (tests/support/proxy.py) in front of the sidecar; closed at the end."""
    made: list[Proxy] = []

    def make(**options: Any) -> Proxy:
        made.append(Proxy(sidecar.address, **options))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()
