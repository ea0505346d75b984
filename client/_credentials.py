"""Channel credentials from PEM files, as the command-line tools take them."""

from __future__ import annotations

from pathlib import Path

import grpc

TLS_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--tls-ca", "QUOTA_TLS_CA", "speak TLS, trusting this PEM CA bundle (the system's roots when empty)"),
    ("--tls-cert", "QUOTA_CLIENT_TLS_CERT", "PEM client certificate for mutual TLS"),
    ("--tls-key", "QUOTA_CLIENT_TLS_KEY", "PEM private key of --tls-cert"),
)
"""The command-line tools' TLS flags: (flag, environment variable, help)."""


def tls_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting the `ca` bundle (the system's roots when None), presenting
    `cert` and `key` for mutual TLS; None, for a plaintext channel, when no file is given."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key: give both or neither")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
