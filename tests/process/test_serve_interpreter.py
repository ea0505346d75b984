"""How `quota-sidecar serve` sets up the interpreter it runs in (issue 13, item 7).

A small call's thread waits for the interpreter lock each time it comes back from
SQLite or gRPC; while a large call's Python work runs, each such wait lasted up to the
switch interval (5 ms by default). `serve` shortens it for the whole process, first
thing, so every later thread of the sidecar runs with it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from quota_sidecar.server.cli import SWITCH_INTERVAL_S
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Channel, MessageKind
from quota_sidecar.server.engine import Engine, PlanInput, SendRequest
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.sidecar import START

SERVE_THEN_REPORT = """
import sys
from quota_sidecar.server.cli import main
code = main(["serve", "--address", "nonsense", "--ledger", sys.argv[1]])
print(code, sys.getswitchinterval())
"""


def _run(script: str, ledger: str, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """`script` in a Python process of its own, given the ledger as its argument; it must exit 0."""
    return subprocess.run(
        [sys.executable, "-c", script, ledger], capture_output=True, text=True, timeout=timeout, check=True
    )


def test_serve_shortens_the_interpreter_switch_interval_of_its_process(tmp_path: Path) -> None:
    """Issue 13 item 7: the real `serve` entry point, in a process of its own, leaves the
    switch interval at SWITCH_INTERVAL_S (a start refused for a bad setting still ran it)."""
    assert sys.getswitchinterval() > SWITCH_INTERVAL_S
    code, interval = _run(SERVE_THEN_REPORT, str(tmp_path / "l.db"), timeout=60).stdout.split()
    assert code == "2"
    assert float(interval) == SWITCH_INTERVAL_S


SERVE_THEN_COUNT_FROZEN = """
import gc, os, signal, sys, threading, time
from quota_sidecar.server.cli import main

def report():
    deadline = time.monotonic() + 60
    while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    print(gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
code = main(["serve", "--address", "127.0.0.1:0", "--metrics-address", "", "--ledger", sys.argv[1]])
print(code)
"""


def test_serve_keeps_what_it_loaded_at_start_out_of_the_collectors_full_passes(tmp_path: Path) -> None:
    """Issue 13 item 9: once `serve` has loaded a ledger (2,000 tenants: their plans, figures
    and dedupe filters), what it loaded is frozen out of the garbage collector's generations
    (gc.freeze), so no full collection walks it while calls wait; the real entry point, in a
    process of its own, then stops on SIGTERM with exit 0."""
    ledger = SQLiteLedger(tmp_path / "l.db")
    ledger.open()
    engine = Engine(ledger, FakeClock(START))
    for n in range(2_000):
        engine.put_plan(f"t{n}", PlanInput(preset="active-cycle-hard", contact_limit=10))
        engine.check_send(SendRequest(f"t{n}", "c", Channel.EMAIL, MessageKind.CAMPAIGN))
    ledger.close()
    result = _run(SERVE_THEN_COUNT_FROZEN, f"sqlite:///{tmp_path / 'l.db'}", timeout=120)
    frozen, code = result.stdout.split()
    assert code == "0"
    assert int(frozen) > 2_000 * 10, result.stderr
