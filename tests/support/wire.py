"""A TCP relay between a client and the real PostgreSQL that reads the client's side of the
wire protocol and counts its messages: statements (an Execute of the extended protocol, or
a simple Query) and round trips (a Sync or a simple Query: the client then waits for the
server's ReadyForQuery before it learns anything the server answered). Connections through
it must not be encrypted (`sslmode=disable&gssencmode=disable`)."""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

_CHUNK = 65536


class WireCount:
    """The client messages the relay has seen, by type byte, over all its connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()

    def add(self, kind: str) -> None:
        with self._lock:
            self._seen[kind] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._seen)

    @property
    def statements(self) -> int:
        seen = self.snapshot()
        return seen["E"] + seen["Q"]

    @property
    def round_trips(self) -> int:
        seen = self.snapshot()
        return seen["S"] + seen["Q"]


def _pump(source: socket.socket, sink: socket.socket, count: WireCount | None) -> None:
    """Forwards bytes until either side closes; counts each whole client message first."""
    pending = b""
    started = count is None
    try:
        while True:
            data = source.recv(_CHUNK)
            if not data:
                return
            if count is not None:
                pending += data
                while True:
                    if not started:
                        if len(pending) < 4:
                            break
                        (length,) = struct.unpack("!i", pending[:4])
                        if len(pending) < length:
                            break
                        pending = pending[length:]
                        started = True
                        continue
                    if len(pending) < 5:
                        break
                    (length,) = struct.unpack("!i", pending[1:5])
                    if len(pending) < 1 + length:
                        break
                    count.add(chr(pending[0]))
                    pending = pending[1 + length :]
            sink.sendall(data)
    except OSError:
        return
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def counting_relay(host: str, port: int) -> Iterator[tuple[int, WireCount]]:
    """A relay on a free loopback port to `host:port`; yields its port and its count."""
    count = WireCount()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    links: list[socket.socket] = [listener]

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            links.extend((client, server))
            threading.Thread(target=_pump, args=(client, server, count), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client, None), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], count
    finally:
        stop.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for s in links:
            try:
                s.close()
            except OSError:
                pass
        acceptor.join(5)
