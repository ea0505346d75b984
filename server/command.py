"""The `quota-sidecar` entry point: refuses in one line when the `server` extra is missing.

The base distribution carries only the client; the service's modules import its extra's
dependencies at load time, so without them `quota-sidecar` would end in a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Top-level modules of the `server` extra's distributions (pyproject.toml).
SERVER_MODULES = frozenset(
    {"grpc_health", "grpc_reflection", "grpc_status", "sqlite_utils", "prometheus_client", "rbloom", "yaml"}
)
EXIT_NOT_INSTALLED = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `quota-sidecar` when the server is installed; else says how to install it."""
    try:
        from .cli import main as serve_main
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(
            f"quota-sidecar: the server is not installed ({missing.name} is missing); "
            "install it with: pip install 'quota-sidecar[server]'",
            file=sys.stderr,
        )
        return EXIT_NOT_INSTALLED
    return serve_main(argv)
