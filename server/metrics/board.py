"""The latest usage of every tenant, kept in memory for scrape-time metrics.

The engine puts a tenant's usage here after each committed change to it (in
commit order, so a later figure never gives way to an earlier one); at start the
sidecar fills in every tenant with a plan (`fill`), never over a figure a change
has already put. The metrics collector reads a snapshot and asks the engine
again for tenants whose cycle has ended since (a new cycle's figures differ).
Each entry is three numbers, so 100,000 tenants take a few megabytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..domain.model import Usage, UsageState


@dataclass(frozen=True, slots=True)
class TenantFigure:
    usage_ratio: float
    state: UsageState
    cycle_end_us: int


class UsageBoard:
    def __init__(self) -> None:
        self._figures: dict[str, TenantFigure] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _figure(usage: Usage) -> TenantFigure:
        return TenantFigure(usage.usage_ratio, usage.state, usage.cycle_end_us)

    def put(self, usage: Usage) -> None:
        figure = self._figure(usage)
        with self._lock:
            self._figures[usage.tenant_id] = figure

    def fill(self, usages: Iterable[Usage]) -> int:
        """Adds tenants not on the board yet; returns how many were added."""
        added = 0
        for usage in usages:
            figure = self._figure(usage)
            with self._lock:
                if usage.tenant_id not in self._figures:
                    self._figures[usage.tenant_id] = figure
                    added += 1
        return added

    def snapshot(self, now_us: int, refresh: Callable[[str], Usage | None]) -> dict[str, TenantFigure]:
        """Every tenant's figure; those of ended cycles are read again through `refresh`."""
        with self._lock:
            figures = dict(self._figures)
        for tenant_id, figure in figures.items():
            if figure.cycle_end_us <= now_us:
                usage = refresh(tenant_id)
                if usage is not None:
                    figures[tenant_id] = self._figure(usage)
                    with self._lock:
                        current = self._figures.get(tenant_id)
                        if current is not None and current.cycle_end_us <= now_us:
                            self._figures[tenant_id] = figures[tenant_id]
        return figures

    def __len__(self) -> int:
        return len(self._figures)
