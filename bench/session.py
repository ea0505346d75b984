"""One benchmark run's shared state: its temporary folder, processes, sizes and figures."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from processes import Processes
from sizes import Sizes
from timing import Results


@dataclass
class Session:
    folder: Path
    processes: Processes
    sizes: Sizes
    repeat: int
    results: Results = field(default_factory=Results)
    started: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        """One line on stderr, so a long run shows where it is."""
        print(f"[{time.monotonic() - self.started:7.1f} s] {message}", file=sys.stderr, flush=True)
