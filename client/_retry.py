"""How a call is retried when the sidecar answers UNAVAILABLE.

Only UNAVAILABLE is retried: the sidecar either was not reached or could not commit, so
nothing was acknowledged, and the calls that count carry a request_id that makes a
repeat harmless. DEADLINE_EXCEEDED is not retried: the call has already spent its time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with full jitter, bounded in attempts and in time.

    attempts: tries in all, the first included (1 means no retry).
    backoff: the upper bound of the first pause, in seconds; each later pause may be
        `multiplier` times longer, up to `max_backoff`.
    max_elapsed: no retry starts once this many seconds have passed since the call began
        (pause included). The call's timeout bounds it all the same: each try is sent
        with what remains of it, and no retry is made whose pause would outlast it.
    """

    attempts: int = 3
    backoff: float = 0.025
    multiplier: float = 2.0
    max_backoff: float = 0.5
    max_elapsed: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_elapsed < 0:
            raise ValueError("Retry pauses and max_elapsed must not be negative")
        if self.multiplier < 1:
            raise ValueError("Retry.multiplier must be at least 1")

    @classmethod
    def of(cls, retries: int | Retry) -> Retry:
        """A Retry from the clients' `retries` argument: an int is the number of retries."""
        if isinstance(retries, Retry):
            return retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a Retry or a count of at least 0, got {retries!r}")
        return cls(attempts=retries + 1)

    def pause(self, attempt: int, elapsed: float, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after failed try number `attempt` (1-based),
        or None when no retry is left."""
        if attempt >= self.attempts:
            return None
        ceiling = min(self.max_backoff, self.backoff * self.multiplier ** (attempt - 1))
        pause = rng.uniform(0, ceiling)
        if elapsed + pause >= self.max_elapsed:
            return None
        return pause
