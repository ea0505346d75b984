"""The floors and baselines measured beside the sidecar in the same run.

- the gRPC floor: a no-op unary RPC on the sidecar's server stack
  (bench/noop_server.py in its own process), called as CheckSend is called;
- the Redis baseline: what teams write instead, a Lua script on the local Redis
  with redis-py, one call at a time and pipelined, and its memory per member
  (neither durable nor policy-aware);
- SQLite's own rate for the ledger's insert pattern on this disk (WAL,
  synchronous=FULL), one row per commit and in group commits, and its bytes per row.
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from noop_server import METHOD
from processes import NoopServerProcess
from session import Session
from timing import latencies, new_contact_ids, percentile, rate_in_threads, shares

UNARY_TIMEOUT = 10.0
# What the no-op call carries: about the size of a CheckSendRequest's fields.
FLOOR_REQUEST = b"\n\x05bench\x12\x10" + b"0123456789abcdef" + b"\x18\x01\x20\x01"

REDIS_KEYS = ("redis.p50_ms", "redis.p99_ms", "redis.pipelined_new", "redis.pipelined_active", "redis.bytes_per_member")
REDIS_LIMIT = 10**12
# "if SISMEMBER then ok elseif SCARD < limit then SADD, ok else deny": 1 already a
# member, 2 added, 0 denied.
REDIS_SCRIPT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 2
end
return 0
"""

SQLITE_TABLE = """
CREATE TABLE activation (
  tenant_key INTEGER NOT NULL,
  contact_id TEXT NOT NULL,
  activated_at INTEGER NOT NULL,
  sends INTEGER NOT NULL,
  PRIMARY KEY (tenant_key, contact_id)
) WITHOUT ROWID
"""
SQLITE_INSERT = "INSERT INTO activation (tenant_key, contact_id, activated_at, sends) VALUES (?, ?, ?, ?)"


class GrpcFloor:
    """The no-op server process and a channel to it. Each `measure()` adds one run of the
    floor's figures: p50/p99 of one caller and calls/s of `threads` callers, each its own
    stub on the one channel. The checksend scenario measures it right before each of its
    own runs, so that both see the same moment of a shared machine."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._server = NoopServerProcess(session.processes)
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> GrpcFloor:
        self._server.__enter__()
        try:
            self._channel = grpc.insecure_channel(self._server.address)
            call = functools.partial(self._channel.unary_unary(METHOD), FLOOR_REQUEST, timeout=UNARY_TIMEOUT)
            latencies([call] * self.session.sizes.warmup)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def measure(self) -> None:
        assert self._channel is not None
        s, results = self.session.sizes, self.session.results
        call = functools.partial(self._channel.unary_unary(METHOD), FLOOR_REQUEST, timeout=UNARY_TIMEOUT)
        samples = latencies([call] * s.calls)
        results.add("floor.p50_ms", percentile(samples, 0.5) * 1e3)
        results.add("floor.p99_ms", percentile(samples, 0.99) * 1e3)
        callers = [_noop_caller(self._channel, n) for n in shares(s.concurrent_calls, s.threads)]
        results.add("floor.rate", rate_in_threads(callers))

    def __exit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._server.__exit__(None, None, None)


def grpc_floor(session: Session) -> None:
    """The floor on its own, `repeat` runs."""
    with GrpcFloor(session) as floor:
        for _ in range(session.repeat):
            floor.measure()


def _noop_caller(channel: grpc.Channel, calls: int) -> Callable[[], int]:
    stub = channel.unary_unary(METHOD)

    def run() -> int:
        for _ in range(calls):
            stub(FLOOR_REQUEST, timeout=UNARY_TIMEOUT)
        return calls

    return run


def redis_baseline(session: Session) -> None:
    """The Lua script on the local Redis (db 0, keys under a fresh prefix, deleted after)."""
    try:
        import redis
    except ImportError:
        for key in REDIS_KEYS:
            session.results.missing(key, "redis-py is not installed (pip install -e '.[bench]')")
        return
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        client.ping()
    except redis.RedisError as exc:
        for key in REDIS_KEYS:
            session.results.missing(key, f"no Redis at 127.0.0.1:6379: {exc}")
        client.close()
        return
    s = session.sizes
    prefix = f"quota-bench:{secrets.token_hex(6)}:"
    script = client.register_script(REDIS_SCRIPT)
    try:
        warm = f"{prefix}warmup"
        latencies([functools.partial(script, keys=[warm], args=[c, REDIS_LIMIT]) for c in new_contact_ids(s.warmup)])
        _pipelined(client, script, warm, new_contact_ids(s.warmup), s.redis_pipeline)
        for run in range(session.repeat):
            key = f"{prefix}{run}:calls"
            ids = new_contact_ids(s.redis_calls)
            samples = latencies([functools.partial(script, keys=[key], args=[c, REDIS_LIMIT]) for c in ids])
            session.results.add("redis.p50_ms", percentile(samples, 0.5) * 1e3)
            session.results.add("redis.p99_ms", percentile(samples, 0.99) * 1e3)
            members = new_contact_ids(s.redis_members)
            key = f"{prefix}{run}:members"
            before = int(client.info("memory")["used_memory"])
            session.results.add("redis.pipelined_new", _pipelined(client, script, key, members, s.redis_pipeline))
            after = int(client.info("memory")["used_memory"])
            session.results.add("redis.bytes_per_member", (after - before) / len(members))
            session.results.add("redis.pipelined_active", _pipelined(client, script, key, members, s.redis_pipeline))
            client.delete(f"{prefix}{run}:calls", key)
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


def _pipelined(client: object, script: Callable[..., object], key: str, members: list[str], size: int) -> float:
    """Decisions per second: the median over pipelines of `size` script calls."""
    rates = []
    for at in range(0, len(members), size):
        chunk = members[at : at + size]
        pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
        for member in chunk:
            script(keys=[key], args=[member, REDIS_LIMIT], client=pipe)
        started = time.perf_counter()
        answers = pipe.execute()
        rates.append(len(chunk) / (time.perf_counter() - started))
        if not all(answers):
            raise RuntimeError("the Redis script denied a member under a limit it cannot reach")
    return statistics.median(rates)


def sqlite_rate(session: Session) -> None:
    """Raw sqlite3 on a file in the run's folder: rows/s at 1 row per commit and in group
    commits, and bytes per row once the WAL is checkpointed."""
    s = session.sizes
    for run in range(session.repeat):
        path = session.folder / f"sqlite-floor-{run}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(SQLITE_TABLE)
            now = time.time_ns() // 1000
            warm = [(0, c, now, 1) for c in new_contact_ids(s.warmup)]
            _commit_each(conn, warm[: s.warmup // 10])
            _commit_groups(conn, warm[s.warmup // 10 :], s.sqlite_rows_per_commit)
            single = [(1, c, now, 1) for c in new_contact_ids(s.sqlite_single_commits)]
            started = time.perf_counter()
            _commit_each(conn, single)
            session.results.add("sqlite.rows_single", len(single) / (time.perf_counter() - started))
            grouped = [(2, c, now, 1) for c in new_contact_ids(s.sqlite_rows)]
            started = time.perf_counter()
            _commit_groups(conn, grouped, s.sqlite_rows_per_commit)
            session.results.add("sqlite.rows_grouped", len(grouped) / (time.perf_counter() - started))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        rows = len(warm) + len(single) + len(grouped)
        session.results.add("sqlite.bytes_per_row", ledger_bytes(path) / rows)
        remove_ledger(path)


def _commit_each(conn: sqlite3.Connection, rows: list[tuple[int, str, int, int]]) -> None:
    for row in rows:
        conn.execute("BEGIN")
        conn.execute(SQLITE_INSERT, row)
        conn.execute("COMMIT")


def _commit_groups(conn: sqlite3.Connection, rows: list[tuple[int, str, int, int]], size: int) -> None:
    for at in range(0, len(rows), size):
        conn.execute("BEGIN")
        conn.executemany(SQLITE_INSERT, rows[at : at + size])
        conn.execute("COMMIT")


def ledger_bytes(path: Path) -> int:
    """The database file plus its -wal and -shm files, where present."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def remove_ledger(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
