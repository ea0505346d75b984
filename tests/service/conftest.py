"""Fixtures of the service tier: its sidecar and engine run on every ledger backend
(support/both_backends.py)."""

from __future__ import annotations

from support.both_backends import engine, ledger_url, sidecar, sidecar_with_metrics

__all__ = ["engine", "ledger_url", "sidecar", "sidecar_with_metrics"]
