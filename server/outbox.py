"""The readers of the usage-event outbox: the live feed and webhook delivery.

Events are written to the ledger in the transaction of the decision that caused
them (engine `_observe`), so an event exists exactly when its change does. The
ledger is the only queue: `EventFeed` only wakes readers when a commit added
events, and every reader reads the events themselves from the ledger by
sequence. Delivery is at least once: the webhook's position moves past an event
only after the receiver answered 2xx, so an event can be delivered again after
a crash between the answer and that write, never lost; receivers dedupe on
`event_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from .clock import MICROS
from .ledger import Ledger, LedgerReader
from .metrics import Metrics
from .model import Usage, UsageEvent

log = logging.getLogger("quota_sidecar.outbox")

WEBHOOK = "webhook"
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


def _instant(us: int) -> str:
    return datetime.fromtimestamp(us / MICROS, UTC).isoformat().replace("+00:00", "Z")


def usage_json(u: Usage) -> dict[str, object]:
    return {
        "tenant_id": u.tenant_id,
        "cycle_start": _instant(u.cycle_start_us),
        "cycle_end": _instant(u.cycle_end_us),
        "active_contacts": u.active_contacts,
        "contact_limit": u.contact_limit,
        "usage_ratio": u.usage_ratio,
        "sends": u.sends,
        "sends_limit": u.sends_limit,
        "state": u.state.name,
        "overage_contacts": u.overage_contacts,
        "overage_amount": u.overage_amount,
        "currency": u.currency,
        "plan_name": u.plan_name,
        "peak_contacts": u.peak_contacts,
    }


def event_json(e: UsageEvent) -> bytes:
    """The webhook body: the event with the names of its enums, instants in RFC 3339."""
    body = {
        "event_id": e.event_id,
        "sequence": e.sequence,
        "type": e.type.name,
        "figure": e.figure.name,
        "tenant_id": e.tenant_id,
        "threshold": e.threshold,
        "occurred_at": _instant(e.at_us),
        "usage": usage_json(e.usage),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Backoff:
    """Pauses between failed deliveries: doubling from `first`, capped at `most`."""

    def __init__(self, first: float = 0.5, most: float = 60.0) -> None:
        self.first = first
        self.most = most

    def pause(self, failures: int) -> float:
        return min(self.most, self.first * 2 ** max(0, failures - 1))


class Webhook:
    """Posts every usage event, in sequence order, to one URL (JSON, one per request).

    Headers: `X-Quota-Event-Id`, and `X-Quota-Signature: sha256=<hex HMAC of the
    body>` when a secret is set. A failed post (no answer, timeout, non-2xx) is
    retried with `Backoff` until it succeeds or the sidecar stops; later events
    wait behind it so the receiver sees them in order.
    """

    def __init__(
        self,
        ledger: Ledger,
        feed: EventFeed,
        metrics: Metrics,
        url: str,
        *,
        secret: str | None = None,
        timeout: float = 5.0,
        backoff: Backoff | None = None,
        post: Callable[[str, bytes, dict[str, str], float], int] | None = None,
    ) -> None:
        self.ledger = ledger
        self.feed = feed
        self.metrics = metrics
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.post = post or _post
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def pending(self, now_us: int) -> tuple[int, float]:
        """Events not yet delivered, and the age in seconds of the oldest."""

        count, oldest = self.ledger.read(lambda r: r.pending_events(r.event_cursor(WEBHOOK)))
        return count, (now_us - oldest) / MICROS if oldest is not None else 0.0

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                seen, events = self.ledger.read(_undelivered)
            except Exception as exc:
                failures += 1
                log.warning("webhook: cannot read the outbox (%s); retrying", exc)
                self._stop.wait(self.backoff.pause(failures))
                continue
            if not events:
                self.feed.wait(seen, timeout=5.0)
                continue
            for event in events:
                failures = self._deliver(event, failures)
                if self._stop.is_set():
                    return

    def _deliver(self, event: UsageEvent, failures: int) -> int:
        """Posts one event until it is delivered and its position written; returns
        the failures in a row left after it (0 once delivered)."""
        body = event_json(event)
        headers = {"Content-Type": "application/json", "X-Quota-Event-Id": event.event_id}
        if self.secret:
            headers["X-Quota-Signature"] = signature(self.secret, body)
        while not self._stop.is_set():
            try:
                status = self.post(self.url, body, headers, self.timeout)
                problem = None if 200 <= status < 300 else f"HTTP {status}"
            except (OSError, urllib.error.URLError) as exc:
                problem = str(exc)
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


def _undelivered(r: LedgerReader) -> tuple[int, list[UsageEvent]]:
    seen = r.event_cursor(WEBHOOK)
    return seen, r.events_after(seen, "", READ_AHEAD)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
