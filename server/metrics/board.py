"""The latest usage of every tenant, kept in memory for scrape-time metrics.

The engine puts a tenant's usage here after each committed change to it (in
commit order, so a later figure never gives way to an earlier one); at start the
sidecar fills in every tenant with a plan (`fill`), never over a figure a change
has already put. The metrics collector reads a snapshot and asks the engine
again for tenants whose cycle has ended since (a new cycle's figures differ).
Each entry is three numbers, so 100,000 tenants take a few megabytes.

With a ledger other sidecars write too, the board only knows this sidecar's own
changes; the collector then reads again the tenants it is about to show
(`reread`), so their figures are the ledger's at the scrape.
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
        # How many times each tenant's figure was put: a figure read from the ledger
        # replaces it only if no commit put a newer one while it was being read.
        self._puts: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _figure(usage: Usage) -> TenantFigure:
        return TenantFigure(usage.usage_ratio, usage.state, usage.cycle_end_us)

    def put(self, usage: Usage) -> None:
        figure = self._figure(usage)
        with self._lock:
            self._figures[usage.tenant_id] = figure
            self._puts[usage.tenant_id] = self._puts.get(usage.tenant_id, 0) + 1

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

    def reread(self, tenant_ids: Iterable[str], read: Callable[[str], Usage | None]) -> dict[str, TenantFigure]:
        """The figures of these tenants read again through `read`, each kept on the board
        unless a commit of this sidecar put a newer one meanwhile."""
        fresh: dict[str, TenantFigure] = {}
        for tenant_id in tenant_ids:
            with self._lock:
                puts = self._puts.get(tenant_id, 0)
            usage = read(tenant_id)
            if usage is None:
                continue
            figure = self._figure(usage)
            with self._lock:
                if self._puts.get(tenant_id, 0) == puts:
                    self._figures[tenant_id] = figure
                fresh[tenant_id] = self._figures.get(tenant_id, figure)
        return fresh

    def __len__(self) -> int:
        return len(self._figures)
