"""How much each scenario does: the quick sizes (a CI smoke run) and the issue's full sizes.

Every field is also a flag of `bench/run.py` (`--memory-contacts 1000000` ...), so a
run can sit anywhere between the two.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    warmup: int
    calls: int
    threads: int
    concurrent_calls: int
    batch: int
    batches: int
    callers: int
    coalesce_calls: int
    rename_contacts: int
    rename_calls: int
    memory_contacts: int
    serving_contacts: tuple[int, ...]
    tenants: int
    tenant_contacts: int
    redis_calls: int
    redis_members: int
    redis_pipeline: int
    sqlite_single_commits: int
    sqlite_rows: int
    sqlite_rows_per_commit: int
    fill_batch: int
    retention_seconds: int
    flood_seconds: int
    floods: int
    flood_batch: int
    flood_activity: int
    sweep_tenants: int
    sweep_seconds: int
    restart_seconds: int
    postgres_calls: int
    fleet_sidecars: int
    race_limit: int


QUICK = Sizes(
    warmup=200,
    calls=2_000,
    threads=8,
    concurrent_calls=2_000,
    batch=1_000,
    batches=10,
    callers=32,
    coalesce_calls=1_600,
    rename_contacts=10_000,
    rename_calls=3,
    memory_contacts=100_000,
    serving_contacts=(100_000,),
    tenants=1_000,
    tenant_contacts=100_000,
    redis_calls=1_000,
    redis_members=50_000,
    redis_pipeline=1_000,
    sqlite_single_commits=200,
    sqlite_rows=50_000,
    sqlite_rows_per_commit=1_000,
    fill_batch=10_000,
    retention_seconds=1,
    flood_seconds=4,
    floods=8,
    flood_batch=10_000,
    flood_activity=20_000,
    sweep_tenants=2_000,
    sweep_seconds=4,
    restart_seconds=5,
    postgres_calls=500,
    fleet_sidecars=3,
    race_limit=200,
)

FULL = Sizes(
    warmup=1_000,
    calls=5_000,
    threads=8,
    concurrent_calls=10_000,
    batch=1_000,
    batches=50,
    callers=32,
    coalesce_calls=10_000,
    rename_contacts=10_000,
    rename_calls=10,
    memory_contacts=1_000_000,
    serving_contacts=(1_000_000, 10_000_000),
    tenants=100_000,
    tenant_contacts=10_000_000,
    redis_calls=5_000,
    redis_members=1_000_000,
    redis_pipeline=1_000,
    sqlite_single_commits=1_000,
    sqlite_rows=1_000_000,
    sqlite_rows_per_commit=1_000,
    fill_batch=10_000,
    retention_seconds=5,
    flood_seconds=20,
    floods=8,
    flood_batch=10_000,
    flood_activity=100_000,
    sweep_tenants=50_000,
    sweep_seconds=20,
    restart_seconds=60,
    postgres_calls=5_000,
    fleet_sidecars=3,
    race_limit=1_000,
)

HELP = {
    "warmup": "calls made before each timed scenario",
    "calls": "CheckSend (and no-op) calls timed one at a time, per run",
    "threads": "callers for the calls/s figures (the issue's 8 in flight)",
    "concurrent_calls": "calls made by those callers together, per run",
    "batch": "contacts per CheckSendBatch",
    "batches": "CheckSendBatch calls timed per run (new, then the same contacts again as active)",
    "callers": "threads calling CheckSend through one QuotaClient (coalesced vs plain)",
    "coalesce_calls": "calls those callers make together, per run and mode",
    "rename_contacts": "contacts in each RecordActivity STATUS_RENAMED call",
    "rename_calls": "RecordActivity calls timed per run",
    "memory_contacts": "contacts activated for the RSS, dedupe and ledger figures",
    "serving_contacts": "comma-separated ledger sizes (active contacts) timed from start to SERVING",
    "tenants": "tenants sharing the same total in the tenant-scaling scenario",
    "tenant_contacts": "active contacts in the ledger for the tenant-scaling scenario (1 tenant vs --tenants)",
    "redis_calls": "Redis script calls timed one at a time, per run",
    "redis_members": "members added through pipelines, per run (also the memory figure)",
    "redis_pipeline": "script calls per Redis pipeline",
    "sqlite_single_commits": "rows inserted one per commit, per run",
    "sqlite_rows": "rows inserted in group commits, per run",
    "sqlite_rows_per_commit": "rows per group commit",
    "fill_batch": "contacts per CheckSendBatch when filling a ledger (at most 10,000)",
    "retention_seconds": "--request-retention of the retention scenario's sidecar; it runs 4 times as long per run",
    "flood_seconds": "seconds a lone caller (another tenant) calls CheckSend, unloaded and under each flood, per run",
    "floods": "callers flooding the sidecar with CheckSendBatch calls at once",
    "flood_batch": "contacts per flooding CheckSendBatch (at most 10,000)",
    "flood_activity": "contacts per flooding RecordActivity STATUS_RENAMED",
    "sweep_tenants": "tenants past a notify threshold, each swept for a reminder every second",
    "sweep_seconds": "seconds the lone caller calls while reminder sweeps run, per run",
    "restart_seconds": "seconds after SERVING the lone caller calls while the filters build, per run",
    "postgres_calls": "CheckSend calls per figure and run on PostgreSQL (one at a time, and by the callers together)",
    "fleet_sidecars": "sidecars sharing one PostgreSQL ledger in the fleet scenario (measured against 1)",
    "race_limit": "HARD limit the fleet's callers race for, asking for twice as many new contacts, per run",
}
