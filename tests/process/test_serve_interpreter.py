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

SERVE_THEN_REPORT = """
import sys
from quota_sidecar.server.cli import main
code = main(["serve", "--address", "nonsense", "--ledger", sys.argv[1]])
print(code, sys.getswitchinterval())
"""


def test_serve_shortens_the_interpreter_switch_interval_of_its_process(tmp_path: Path) -> None:
    """Issue 13 item 7: the real `serve` entry point, in a process of its own, leaves the
    switch interval at SWITCH_INTERVAL_S (a start refused for a bad setting still ran it)."""
    assert sys.getswitchinterval() > SWITCH_INTERVAL_S
    result = subprocess.run(
        [sys.executable, "-c", SERVE_THEN_REPORT, str(tmp_path / "l.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    code, interval = result.stdout.split()
    assert code == "2"
    assert float(interval) == SWITCH_INTERVAL_S
