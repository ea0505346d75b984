"""The readers of the usage-event outbox: the live feed and webhook delivery.

Events are written to the ledger in the transaction of the decision that caused
them (engine `_observe`), so an event exists exactly when its change does. The
ledger is the only queue: `EventFeed` only wakes readers when a commit added
events, and every reader reads the events themselves from the ledger by
sequence. Delivery is at least once: the webhook's position moves past an event
only after the receiver answered 2xx, so an event can be delivered again after
a crash between the answer and that write, never lost; receivers dedupe on
`event_id`.

Several sidecars sharing a ledger may all be given the webhook: one delivers at a
time, the holder of the ledger's `webhook` lease, which it keeps renewed as it posts;
the others wait and take the lease over once it lapses (the holder was killed) or is
let go (it stopped). Delivery continues from the position kept in the ledger, so a
takeover repeats at most the post the old holder was making, and never skips one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import importlib.metadata
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from quota_sidecar.api.json_mapping import message_json

from ..domain.clock import MICROS
from ..domain.model import UsageEvent
from ..engine.upkeep import WEBHOOK_CONSUMER
from ..grpc.convert import usage_event_pb
from ..ledger import HeldLease, Ledger, LedgerReader
from ..metrics.prometheus import Metrics

log = logging.getLogger("quota_sidecar.outbox")

# The consumer and the lease the webhook keeps its position and its turn under.
WEBHOOK = WEBHOOK_CONSUMER
READ_AHEAD = 100


class EventFeed:
    """Wakes the readers of the outbox when committed events arrive, and on close."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._latest = 0
        self.closed = False

    def publish(self, events: Sequence[UsageEvent]) -> None:
        with self._changed:
            self._latest = max(self._latest, max(e.sequence for e in events))
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Waits until an event beyond `seen` is published, the feed closes or the
        timeout passes; returns the latest sequence published."""
        with self._changed:
            self._changed.wait_for(lambda: self._latest > seen or self.closed, timeout)
            return self._latest

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


def event_json(e: UsageEvent) -> bytes:
    """The webhook body: the event as a UsageEvent message in the proto3 JSON mapping
    (quota_sidecar.api.json_mapping), the form quotactl --json and other languages use."""
    return message_json(usage_event_pb(e)).encode()


def _mac(secret: str, signed: bytes) -> str:
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature(secret: str, body: bytes) -> str:
    """`X-Quota-Signature`: the HMAC of the body alone (kept for receivers that check it)."""
    return "sha256=" + _mac(secret, body)


def timestamped_signature(secret: str, body: bytes, stamp: int) -> str:
    """`X-Quota-Signature-V1`: the HMAC of `<stamp>.<body>`, so the time is part of what is
    signed and a receiver that refuses old stamps refuses replays."""
    return f"t={stamp},v1={_mac(secret, str(stamp).encode() + b'.' + body)}"


def user_agent() -> str:
    return f"quota-sidecar/{importlib.metadata.version('quota-sidecar')}"


@dataclass(frozen=True)
class Target:
    """Where a webhook URL posts: the connection, the request target, and the Basic auth
    header its `user:password@` part (percent-decoded) turns into."""

    https: bool
    host: str
    port: int | None
    path: str
    authorization: str | None

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme == "https", parts.hostname or "", parts.port, path, authorization)


class Poster:
    """POSTs to one `Target` with a deadline on the whole attempt.

    A socket timeout bounds each read, so a receiver trickling a byte at a time would hold
    an attempt forever; here a timer shuts the connection down when `timeout` has passed,
    whatever stage the exchange is at. `cancel` does the same at once, so stopping never
    waits for a receiver. Redirects are not followed: the answer of the configured URL is
    the answer.
    """

    def __init__(self, target: Target, agent: str) -> None:
        self.target = target
        self.agent = agent
        self._lock = threading.Lock()
        self._current: tuple[http.client.HTTPConnection, threading.Event] | None = None
        self._cancelled = False

    def post(self, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        t = self.target
        conn: http.client.HTTPConnection
        if t.https:
            conn = http.client.HTTPSConnection(t.host, t.port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=timeout)
        cut = threading.Event()
        with self._lock:
            if self._cancelled:
                raise ConnectionAbortedError("the sidecar is stopping")
            self._current = (conn, cut)
        timer = threading.Timer(timeout, _cut_off, (conn, cut))
        timer.daemon = True
        timer.start()
        try:
            conn.connect()
            if cut.is_set():
                raise TimeoutError
            sent = {**headers, "User-Agent": self.agent}
            if t.authorization:
                sent["Authorization"] = t.authorization
            conn.request("POST", t.path, body, sent)
            return conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            if not cut.is_set():
                raise
            stopping = self._cancelled
            raise TimeoutError("the sidecar is stopping" if stopping else f"no answer within {timeout:g} s") from exc
        finally:
            timer.cancel()
            with self._lock:
                self._current = None
            conn.close()

    def cancel(self) -> None:
        """Ends the attempt in flight, if any, and refuses new ones."""
        with self._lock:
            self._cancelled = True
            if self._current is not None:
                _cut_off(*self._current)


def _cut_off(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """Wakes whatever the connection is blocked on (shutdown, unlike close, interrupts a
    read in another thread); a connection still being opened sees `cut` once it is."""
    cut.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Backoff:
    """Pauses between failed deliveries: doubling from `first`, capped at `most`."""

    def __init__(self, first: float = 0.5, most: float = 60.0) -> None:
        self.first = first
        self.most = most

    def pause(self, failures: int) -> float:
        # typeshed types int ** int as Any (a negative power is a float); this one is never negative.
        doubling: int = 2 ** max(0, failures - 1)
        return min(self.most, self.first * doubling)


class Webhook:
    """Posts every usage event, in sequence order, to one URL (JSON, one per request).

    Headers: `X-Quota-Event-Id`, `User-Agent: quota-sidecar/<version>`, and when a
    secret is set `X-Quota-Timestamp`, `X-Quota-Signature-V1` (see
    `timestamped_signature`) and `X-Quota-Signature` (see `signature`), signed afresh on
    every attempt. A failed post (no answer within `timeout`, a redirect, any other
    non-2xx) is retried with `Backoff` until it succeeds or the sidecar stops; later
    events wait behind it so the receiver sees them in order. Only while it holds the
    ledger's `webhook` lease (`lease`, renewed before an attempt once a third of its time
    has passed) does it post.
    """

    def __init__(
        self,
        ledger: Ledger,
        feed: EventFeed,
        metrics: Metrics,
        url: str,
        *,
        now_us: Callable[[], int],
        secret: str | None = None,
        timeout: float = 5.0,
        backoff: Backoff | None = None,
        lease: HeldLease,
    ) -> None:
        self.ledger = ledger
        self.lease = lease
        self.feed = feed
        self.metrics = metrics
        self.now_us = now_us
        self.secret = secret
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.poster = Poster(Target.parse(url), user_agent())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def stop(self, wait: float | None = None) -> None:
        """Stops delivery, ending the post in flight; waits at most `wait` seconds for the
        thread (only a connection still being opened can outlast the cancel, and it then
        ends without touching the ledger)."""
        self._stop.set()
        self.poster.cancel()
        if self._thread is not None:
            self._thread.join(wait)
        self.lease.release()

    def pending(self, now_us: int) -> tuple[int, float]:
        """Events not yet delivered, and the age in seconds of the oldest."""

        count, oldest = self.ledger.read(lambda r: r.pending_events(r.event_cursor(WEBHOOK)))
        return count, (now_us - oldest) / MICROS if oldest is not None else 0.0

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if not self.lease.hold():
                self._stop.wait(self.lease.ttl_s / 3)
                continue
            try:
                seen, events = self.ledger.read(_undelivered)
            except Exception as exc:
                failures += 1
                log.warning("webhook: cannot read the outbox (%s); retrying", exc)
                self._stop.wait(self.backoff.pause(failures))
                continue
            if not events:
                self.feed.wait(seen, timeout=min(5.0, self.lease.ttl_s / 3))
                continue
            for event in events:
                failures = self._deliver(event, failures)
                if self._stop.is_set() or not self.lease.held:
                    break

    def _deliver(self, event: UsageEvent, failures: int) -> int:
        """Posts one event until it is delivered and its position written; returns
        the failures in a row left after it (0 once delivered)."""
        body = event_json(event)
        while not self._stop.is_set() and self.lease.hold():
            try:
                status = self.poster.post(body, self._headers(event, body), self.timeout)
                problem = None if 200 <= status < 300 else _failure(status)
            except (OSError, http.client.HTTPException) as exc:
                problem = str(exc) or type(exc).__name__
            if problem is None:
                self.metrics.webhook_deliveries.labels("delivered").inc()
                try:
                    self.ledger.transact(lambda tx: tx.put_event_cursor(WEBHOOK, event.sequence))
                except Exception as exc:
                    log.warning("webhook: delivered event %d but cannot record it (%s)", event.sequence, exc)
                    failures += 1
                    self._stop.wait(self.backoff.pause(failures))
                    continue
                if failures:
                    log.info("webhook: delivering again after %d failed attempts", failures)
                return 0
            self.metrics.webhook_deliveries.labels("failed").inc()
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning("webhook: event %d not delivered (%s); attempt %d", event.sequence, problem, failures)
            self._stop.wait(self.backoff.pause(failures))
        return failures

    def _headers(self, event: UsageEvent, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Quota-Event-Id": event.event_id}
        if self.secret:
            stamp = self.now_us() // MICROS
            headers["X-Quota-Timestamp"] = str(stamp)
            headers["X-Quota-Signature-V1"] = timestamped_signature(self.secret, body, stamp)
            headers["X-Quota-Signature"] = signature(self.secret, body)
        return headers


def _failure(status: int) -> str:
    if 300 <= status < 400:
        return f"HTTP {status}, a redirect (not followed: set --webhook-url to where the receiver is)"
    return f"HTTP {status}"


def _undelivered(r: LedgerReader) -> tuple[int, list[UsageEvent]]:
    seen = r.event_cursor(WEBHOOK)
    return seen, r.events_after(seen, "", READ_AHEAD)
