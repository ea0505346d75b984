"""Backing up a live ledger and restoring it, run exactly as docs/operations.md ("Backup and
restore") says: its shell blocks are read from the page and run with the page's paths moved
under the test's folder, against the real `quota-sidecar serve` process taking writes."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.process import Load, Process, ledger_rows, put_plan, start
from support.serving import BIN

pytestmark = pytest.mark.process

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# The page's example folders, moved under tmp_path when its commands run.
LIVE, BACKUPS = "/var/lib/quota", "/var/backups/quota"


def documented_blocks(tmp_path: Path) -> list[list[str]]:
    """The "Backup and restore" section's shell blocks, one command per line, with the page's
    folders replaced by tmp_path/live and tmp_path/backups."""
    text = OPERATIONS.read_text()
    section = text[text.index("## Backup and restore\n") :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"```sh\n(.+?)```", section, flags=re.S)
    moved = [b.replace(LIVE, str(tmp_path / "live")).replace(BACKUPS, str(tmp_path / "backups")) for b in blocks]
    return [block.strip().splitlines() for block in moved]


def run(command: str) -> subprocess.CompletedProcess:
    """One documented command, with this environment's `quota-sidecar` first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=120)


def run_block(block: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs a block's commands in order, as a user would, stopping at the first that fails."""
    done = []
    for command in block:
        result = run(command)
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr}"
        done.append(result)
    return done


def ledger_argument(command: str) -> Path:
    """The file a documented command's `--ledger sqlite:///PATH` names."""
    words = shlex.split(command)
    return Path(words[words.index("--ledger") + 1].removeprefix("sqlite:///"))


def test_a_backup_taken_as_documented_beside_a_serving_sidecar_restores_every_acknowledged_allow(
    tmp_path: Path, processes: list[Process]
) -> None:
    """docs/operations.md "Backup and restore"; SG-8 (an acknowledged ALLOW is counted once, in the
    restored ledger too): the backup is taken while workers keep sending, the sidecar keeps
    committing through it, the restored copy passes `verify`, and a sidecar served from it holds
    every contact acknowledged before the backup, ALREADY_ACTIVE."""
    back_up, restore, serve = documented_blocks(tmp_path)
    (tmp_path / "live").mkdir()
    (tmp_path / "backups").mkdir()
    live = start(tmp_path / "live" / "ledger.db")
    processes.append(live)
    live.wait_serving()
    assert ledger_argument(back_up[0]) == live.ledger
    put_plan(live.address, 1_000_000)
    load = Load(live.address)
    load.start()
    load.wait_for(200)
    with load.lock:
        before = set(load.acknowledged)

    backed_up, checked = run_block(back_up)
    assert checked.stdout.strip().splitlines()[-1] == "every figure equals its rows"
    load.wait_for(len(before) + 200)
    assert live.health() == "SERVING"

    compacted = tmp_path / "backups" / "vacuumed.db"
    reader = sqlite3.connect(live.ledger)
    try:
        reader.execute("VACUUM INTO ?", (str(compacted),))
    finally:
        reader.close()
    assert run(f"quota-sidecar verify --ledger {compacted}").returncode == 0
    assert before <= ledger_rows(compacted).active_ids()

    live.proc.send_signal(signal.SIGTERM)
    assert live.proc.wait(timeout=30) == 0
    load.join()
    assert not list((tmp_path / "backups").glob("*.partial"))

    run_block(restore)
    restored = ledger_argument(serve[0])
    assert restored.parent == tmp_path / "live" and restored.exists()
    ids = ledger_rows(restored).active_ids()
    assert before <= ids <= set(load.acknowledged)

    again = start(restored)
    processes.append(again)
    again.wait_serving()
    with grpc.insecure_channel(again.address) as ch:
        stub = pb_grpc.QuotaServiceStub(ch)
        assert stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage.active_contacts == len(ids)
        r = stub.CheckSendBatch(
            pb.CheckSendBatchRequest(tenant_id="t", channel=1, kind=1, contact_ids=sorted(before), dry_run=True),
            timeout=30,
        )
        assert {x.reason for x in r.results} == {pb.REASON_ALREADY_ACTIVE}
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=30) == 0


def test_a_backup_never_overwrites_and_names_what_it_cannot_copy(tmp_path: Path) -> None:
    """docs/operations.md "Backup and restore", docs/api.md's command-line contract: an existing
    destination is refused (exit 2) and left as it was; a ledger that is not there, or a copy that
    cannot be written, is exit 2 with one line; none leaves a file behind."""
    ledger = tmp_path / "ledger.db"
    sqlite3.connect(ledger).close()
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"an earlier backup")
    refused = run(f"quota-sidecar backup --ledger sqlite:///{ledger} --to {taken}")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [f"quota-sidecar backup: {taken} exists; give a new path"]
    assert taken.read_bytes() == b"an earlier backup"

    missing = run(f"quota-sidecar backup --ledger {tmp_path / 'none.db'} --to {tmp_path / 'copy.db'}")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"quota-sidecar backup: no ledger file at {tmp_path / 'none.db'}"]

    nowhere = tmp_path / "no-such-folder" / "copy.db"
    failed = run(f"quota-sidecar backup --ledger {ledger} --to {nowhere}")
    assert failed.returncode == 2
    assert failed.stderr.startswith(f"quota-sidecar backup: {ledger} could not be copied to {nowhere}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db", "taken.db"]


def test_the_ledger_its_wal_and_a_backup_are_readable_by_their_owner_alone(
    tmp_path: Path, processes: list[Process]
) -> None:
    """They hold every contact id of every tenant: a sidecar creates its ledger (and SQLite
    its -wal and -shm, with the database's mode) 0600, and `backup` its copy 0600, whatever
    the umask (022 here, the common default)."""
    ledger = tmp_path / "ledger.db"
    old = os.umask(0o022)
    try:
        process = start(ledger)
        processes.append(process)
        process.wait_serving()
        put_plan(process.address, 10)
        copy = tmp_path / "copy.db"
        result = run(f"quota-sidecar backup --ledger sqlite:///{ledger} --to {copy}")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    made = [ledger, Path(f"{ledger}-wal"), Path(f"{ledger}-shm"), copy]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o600" for p in made}
