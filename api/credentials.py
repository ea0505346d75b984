"""What the command-line tools of both sides read from files: channel credentials from
PEM files, and secrets given as `<flag>-file`."""

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


def read_secret_file(flag: str, path: str) -> str:
    """The secret held in the file at `path`, without the line ending an editor leaves;
    a ValueError naming `flag` when it cannot be read or is empty."""
    try:
        secret = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {path} is not text") from None
    if not secret.strip():
        raise ValueError(f"{flag}: {path} is empty")
    return secret


def one_secret(flag: str, env: str, value: str | None, file: str | None) -> str | None:
    """The secret given as `value` (flag `flag` or variable `env`), or read from `file`
    (`<flag>-file`); a ValueError when both are given."""
    if file is None:
        return value
    if value is not None:
        raise ValueError(f"{flag}-file: {flag} (or {env}) is given too; give one")
    return read_secret_file(f"{flag}-file", file)
