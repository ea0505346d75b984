"""The one table of medians, their ratios to a floor or baseline and the issue's goals, and the JSON file.

Each row names a figure (its key in `Results`), what it is compared with and the
issue 5 goal it answers, if any. Rows of scenarios that were not run are left out;
a figure that could not be measured is shown as unavailable with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sizes import Sizes
from timing import Results

TEN_MILLION = 10_000_000


@dataclass(frozen=True)
class Goal:
    """A goal of issue 5: every condition must hold. A condition is (kind, bound) with kind
    one of "<=", ">=" (on the figure) and "ratio<=", "ratio>=" (on its ratio)."""

    text: str
    conditions: tuple[tuple[str, float], ...] = ()
    applies: bool = True

    def met(self, value: float, ratio: float | None) -> str:
        if not self.applies:
            return "n/a"
        for kind, bound in self.conditions:
            subject = ratio if kind.startswith("ratio") else value
            if subject is None or math.isnan(subject):
                return "?"
            if (kind.endswith("<=") and subject > bound) or (kind.endswith(">=") and subject < bound):
                return "NO"
        return "yes"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    versus: str | None = None
    versus_label: str = ""
    versus_factor: float = 1.0
    goal: Goal | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Section:
    title: str
    rows: tuple[Row, ...]


def sections(sizes: Sizes, synchronous: str) -> list[Section]:
    x = f"x{sizes.threads}"
    floor = Section(
        "gRPC floor: a no-op unary call on the sidecar's server stack",
        (
            Row("floor.p50_ms", "no-op call p50, 1 caller", "ms"),
            Row("floor.p99_ms", "no-op call p99, 1 caller", "ms"),
            Row("floor.rate", f"no-op calls/s, {sizes.threads} in flight", "/s"),
        ),
    )
    redis = Section(
        "Redis baseline: Lua script via redis-py (neither durable nor policy-aware)",
        (
            Row("redis.p50_ms", "script call p50, 1 caller", "ms"),
            Row("redis.p99_ms", "script call p99, 1 caller", "ms"),
            Row("redis.pipelined_new", f"pipelined x{sizes.redis_pipeline}: decisions/s, new", "/s"),
            Row("redis.pipelined_active", f"pipelined x{sizes.redis_pipeline}: decisions/s, active", "/s"),
            Row("redis.bytes_per_member", "memory per set member", "B"),
        ),
    )
    sqlite = Section(
        "SQLite's own rate: the ledger's insert pattern, WAL, synchronous=FULL",
        (
            Row("sqlite.rows_single", "rows/s, 1 row per commit", "/s"),
            Row("sqlite.rows_grouped", f"rows/s, {sizes.sqlite_rows_per_commit:,} rows per commit", "/s"),
            Row("sqlite.bytes_per_row", "bytes per row on disk", "B"),
        ),
    )

    def versus_floor(key: str, label: str, unit: str, goal: Goal) -> Row:
        base = {"p50_ms": "floor.p50_ms", "p99_ms": "floor.p99_ms", "rate": "floor.rate"}[key.rpartition(".")[2]]
        return Row(key, label, unit, base, "floor", goal=goal)

    p50, p99 = Goal("<= 1.1x floor", (("ratio<=", 1.1),)), Goal("<= 1.3x floor", (("ratio<=", 1.3),))
    rate = Goal(">= 0.9x floor", (("ratio>=", 0.9),))
    five = Goal(">= 5x plain unary", (("ratio>=", 5.0),))
    c = sizes.callers
    calls = Section(
        f"Sidecar calls (quota-sidecar serve, SQLite ledger, synchronous={synchronous})",
        (
            versus_floor("checksend.new.p50_ms", "CheckSend p50, new contact", "ms", p50),
            versus_floor("checksend.new.p99_ms", "CheckSend p99, new contact", "ms", p99),
            versus_floor("checksend.active.p50_ms", "CheckSend p50, active contact", "ms", p50),
            versus_floor("checksend.active.p99_ms", "CheckSend p99, active contact", "ms", p99),
            versus_floor("checksend.new.rate", f"CheckSend calls/s {x}, new", "/s", rate),
            versus_floor("checksend.active.rate", f"CheckSend calls/s {x}, active", "/s", rate),
            Row(
                "batch.new.rate",
                f"CheckSendBatch x{sizes.batch:,}: decisions/s, new",
                "/s",
                "redis.pipelined_new",
                "Redis pipelined",
                goal=Goal(">= 100k/s, >= 2x Redis", ((">=", 100_000), ("ratio>=", 2.0))),
            ),
            Row(
                "batch.active.rate",
                f"CheckSendBatch x{sizes.batch:,}: decisions/s, active",
                "/s",
                "redis.pipelined_active",
                "Redis pipelined",
                goal=Goal(">= 150k/s, >= 2x Redis", ((">=", 150_000), ("ratio>=", 2.0))),
            ),
            Row(
                "coalesce.plain.new.rate",
                f"QuotaClient {c} callers, plain: calls/s, new",
                "/s",
                "floor.rate",
                "floor",
            ),
            Row(
                "coalesce.coalesced.new.rate",
                f"QuotaClient {c} callers, coalesced: calls/s, new",
                "/s",
                "coalesce.plain.new.rate",
                "plain",
                goal=five,
            ),
            Row(
                "coalesce.plain.active.rate",
                f"QuotaClient {c} callers, plain: calls/s, active",
                "/s",
                "floor.rate",
                "floor",
            ),
            Row(
                "coalesce.coalesced.active.rate",
                f"QuotaClient {c} callers, coalesced: calls/s, active",
                "/s",
                "coalesce.plain.active.rate",
                "plain",
                goal=five,
            ),
            Row("rename.seconds", f"RecordActivity STATUS_RENAMED x{sizes.rename_contacts:,} active", "s"),
        ),
    )

    def versus_sqlite(figure: str, label: str, unit: str, goal: Goal | None = None) -> Row:
        return Row(f"postgres.{figure}", label, unit, figure, "SQLite sidecar", goal=goal)

    p50_sqlite = Goal("<= 1.3x SQLite", (("ratio<=", 1.3),))
    on_postgres = Section(
        "The same calls on PostgreSQL (one sidecar, synchronous_commit on; issue 16)",
        (
            versus_sqlite("checksend.new.p50_ms", "CheckSend p50, new contact", "ms", p50_sqlite),
            versus_sqlite("checksend.new.p99_ms", "CheckSend p99, new contact", "ms"),
            versus_sqlite("checksend.active.p50_ms", "CheckSend p50, active contact", "ms", p50_sqlite),
            versus_sqlite("checksend.active.p99_ms", "CheckSend p99, active contact", "ms"),
            versus_sqlite("checksend.new.rate", f"CheckSend calls/s {x}, new", "/s"),
            versus_sqlite("checksend.active.rate", f"CheckSend calls/s {x}, active", "/s"),
            versus_sqlite("batch.new.rate", f"CheckSendBatch x{sizes.batch:,}: decisions/s, new", "/s"),
            versus_sqlite("batch.active.rate", f"CheckSendBatch x{sizes.batch:,}: decisions/s, active", "/s"),
        ),
    )
    f = sizes.fleet_sidecars
    fleet_rows = []
    for figure, label, goal in (
        ("one_tenant.rate", f"CheckSend calls/s {x}, new, one tenant", Goal(">= 2,500/s", ((">=", 2_500),))),
        ("tenants.rate", f"CheckSend calls/s {x}, new, a tenant per caller", None),
        (
            "batch.rate",
            f"CheckSendBatch x{sizes.batch:,} x{f} callers: decisions/s, new, one tenant",
            Goal(">= 50k/s", ((">=", 50_000),)),
        ),
    ):
        fleet_rows.append(Row(f"fleet.1.{figure}", f"1 sidecar: {label}", "/s"))
        fleet_rows.append(
            Row(f"fleet.{f}.{figure}", f"{f} sidecars: {label}", "/s", f"fleet.1.{figure}", "1 sidecar", goal=goal)
        )
    fleet_rows.append(
        Row(
            "fleet.race.over_admitted",
            f"{f} sidecars racing a HARD limit of {sizes.race_limit:,}: admitted past it",
            "contacts",
            goal=Goal("none", (("<=", 0),)),
        )
    )
    on_fleet = Section(
        f"A fleet on one PostgreSQL ledger: 1 vs {f} sidecars, callers dealt round them (issue 16)", tuple(fleet_rows)
    )
    n = _count(sizes.memory_contacts)
    storage_rows = [
        Row(
            "memory.rss_per_million",
            f"RSS growth per 1M active contacts ({n} activated)",
            "MB",
            "redis.bytes_per_member",
            "Redis member",
            versus_factor=1e6,
            scale=1e-6,
        ),
        Row(
            "memory.dedupe_bytes_per_contact",
            f"dedupe per active contact ({n} activated)",
            "B",
            "redis.bytes_per_member",
            "Redis member",
            goal=Goal("<= 2.5 B", (("<=", 2.5),)),
        ),
        Row(
            "ledger.bytes_per_contact",
            f"ledger on disk per active contact ({n})",
            "B",
            "sqlite.bytes_per_row",
            "SQLite row",
            goal=Goal("<= 64 B", (("<=", 64),)),
        ),
        Row(
            "retention.kept_bytes_per_call",
            "ledger growth per CheckSend with a request_id, answers kept",
            "B",
            goal=Goal("<= 100 B", (("<=", 100),)),
        ),
        Row(
            "retention.steady_bytes_per_call",
            f"the same at steady state (--request-retention {sizes.retention_seconds} s)",
            "B",
            "retention.kept_bytes_per_call",
            "answers kept",
            goal=Goal("<= 5 B", (("<=", 5),)),
        ),
        Row("serving.empty.s", "start to SERVING, empty ledger", "s"),
    ]
    for m in sizes.serving_contacts:
        at_goal = m >= TEN_MILLION
        storage_rows += [
            Row(
                f"serving.{m}.s",
                f"start to SERVING, {_count(m)} active contacts",
                "s",
                "serving.empty.s",
                "empty ledger",
                goal=Goal("<= 10 s at 10M", (("<=", 10),), applies=at_goal),
            ),
            Row(
                f"serving.{m}.filters_s",
                f"start to dedupe filters loaded, {_count(m)}",
                "s",
                f"serving.{m}.s",
                "SERVING",
            ),
            Row(
                f"serving.{m}.dedupe_bytes_per_contact",
                f"dedupe per active contact after a restart ({_count(m)})",
                "B",
                "redis.bytes_per_member",
                "Redis member",
                goal=Goal("<= 2.5 B", (("<=", 2.5),)),
            ),
            Row(f"serving.{m}.rss_mb", f"RSS with the filters loaded, {_count(m)}", "MB"),
        ]
    storage = Section("Sidecar memory, ledger and start (16-character contact ids)", tuple(storage_rows))
    t = sizes.tenants
    tenant_rows = []
    for figure, label, unit in (
        ("batch_rate", "CheckSendBatch decisions/s, active", "/s"),
        ("p50_ms", "CheckSend p50, active", "ms"),
        ("rss_mb", "RSS with the filters loaded", "MB"),
        ("dedupe_bytes_per_contact", "dedupe per active contact", "B"),
        ("ledger_bytes_per_contact", "ledger on disk per active contact", "B"),
        ("serving_s", "start to SERVING", "s"),
        ("filters_s", "start to dedupe filters loaded", "s"),
    ):
        tenant_rows.append(Row(f"tenants.1.{figure}", f"1 tenant: {label}", unit))
        tenant_rows.append(
            Row(f"tenants.{t}.{figure}", f"{_count(t)} tenants: {label}", unit, f"tenants.1.{figure}", "1 tenant")
        )
    scaling = Section(
        f"Tenant scaling: {_count(sizes.tenant_contacts)} active contacts in 1 tenant vs {_count(t)} tenants"
        f" (batches of min({sizes.batch:,}, a tenant's share) spread over tenants)",
        tuple(tenant_rows),
    )
    three = (("ratio<=", 3.0),)
    stalls = Section(
        "Stalls: a lone caller's CheckSend while something big runs (issue 13)",
        (
            Row("floods.unloaded.p99_ms", "lone CheckSend p99, unloaded", "ms"),
            Row(
                "floods.batches.p99_ms",
                f"lone CheckSend p99, {sizes.floods} floods of CheckSendBatch x{sizes.flood_batch:,}",
                "ms",
                "floods.unloaded.p99_ms",
                "unloaded",
                goal=Goal("<= 3x unloaded", three),
            ),
            Row(
                "floods.activity.p99_ms",
                f"lone CheckSend p99, RecordActivity x{_count(sizes.flood_activity)} running",
                "ms",
                "floods.unloaded.p99_ms",
                "unloaded",
                goal=Goal("<= 3x unloaded", three),
            ),
            Row("sweep.without.p99_ms", f"lone CheckSend p99, {_count(sizes.sweep_tenants)} tenants, no sweep", "ms"),
            Row(
                "sweep.during.p99_ms",
                f"lone CheckSend p99, reminder sweeps of {_count(sizes.sweep_tenants)} tenants",
                "ms",
                "sweep.without.p99_ms",
                "no sweep",
                goal=Goal("<= 1.5x no sweep", (("ratio<=", 1.5),)),
            ),
            Row("sweep.without.max_ms", f"lone CheckSend max, {_count(sizes.sweep_tenants)} tenants, no sweep", "ms"),
            Row(
                "sweep.during.max_ms",
                f"lone CheckSend max, reminder sweeps of {_count(sizes.sweep_tenants)} tenants",
                "ms",
                "sweep.without.max_ms",
                "no sweep",
                goal=Goal("<= 3x no sweep", three),
            ),
            Row("restart.steady.p99_ms", f"CheckSend p99, {_count(sizes.tenants)} tenants, filters built", "ms"),
            Row(
                "restart.early.p99_ms",
                f"CheckSend p99, first {sizes.restart_seconds} s after a restart",
                "ms",
                "restart.steady.p99_ms",
                "filters built",
                goal=Goal("<= 3x filters built", three),
            ),
            Row(
                "restart.first_ms",
                "first CheckSend after a restart",
                "ms",
                "restart.steady.p99_ms",
                "filters built",
                goal=Goal("<= 3x filters built", three),
            ),
            Row("restart.early.slow_calls", f"calls over 100 ms, first {sizes.restart_seconds} s", "calls"),
        ),
    )
    return [floor, redis, sqlite, calls, on_postgres, on_fleet, storage, scaling, stalls]


def _count(n: int) -> str:
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{suffix}"
    return f"{n:,}"


def _format(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "contacts":
        return f"{value:,.0f} contacts"
    if unit == "MB":
        return f"{value:,.1f} MB"
    return f"{value:,.1f} {unit}"


@dataclass(frozen=True)
class Line:
    section: str
    key: str
    label: str
    median: float | None
    shown: str
    versus: str
    ratio: float | None
    goal: str
    met: str


def evaluate(results: Results, sizes: Sizes, synchronous: str) -> list[Line]:
    lines = []
    for section in sections(sizes, synchronous):
        for row in section.rows:
            median = results.median(row.key)
            if median is None and row.key not in results.unavailable:
                continue
            ratio = None
            if median is not None and row.versus is not None:
                base = results.median(row.versus)
                if base:
                    ratio = median / (base * row.versus_factor)
            if median is None:
                shown, met = "unavailable", "?" if row.goal else ""
            else:
                shown = _format(median * row.scale, row.unit)
                met = row.goal.met(median, ratio) if row.goal else ""
            lines.append(
                Line(
                    section.title,
                    row.key,
                    row.label,
                    median,
                    shown,
                    row.versus_label if row.versus else "",
                    ratio,
                    row.goal.text if row.goal else "",
                    met,
                )
            )
    return lines


def table(lines: list[Line], results: Results, failures: dict[str, str], footer: list[str]) -> str:
    width = max([len(line.label) for line in lines] + [30])
    head = f"{'figure':<{width}}  {'median':>15}  {'ratio':>7}  {'vs':<16}  {'goal (issue 5, 13, 16)':<26}  met"
    out = [head, "-" * len(head)]
    section = None
    for line in lines:
        if line.section != section:
            section = line.section
            out.append(f"[{section}]")
        ratio = f"{line.ratio:.2f}x" if line.ratio is not None else ""
        out.append(
            f"{line.label:<{width}}  {line.shown:>15}  {ratio:>7}  {line.versus:<16}  {line.goal:<26}  {line.met}"
        )
    out.append("-" * len(head))
    for key, why in results.unavailable.items():
        out.append(f"unavailable: {key}: {why}")
    for scenario, why in failures.items():
        out.append(f"FAILED: {scenario}: {why.splitlines()[0] if why else ''}")
    out.extend(footer)
    return "\n".join(out)


def write_json(
    path: Path,
    lines: list[Line],
    results: Results,
    failures: dict[str, str],
    sizes: Sizes,
    extra: dict[str, Any],
) -> None:
    document = {
        **extra,
        "sizes": asdict(sizes),
        "figures": results.figures,
        "unavailable": results.unavailable,
        "failures": failures,
        "table": [asdict(line) for line in lines],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
