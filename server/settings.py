"""The one settings object: flags over `QUOTA_*` environment variables over defaults.

Validated before any port is bound; a bad setting stops the start with one
clear line (`SettingsError`). The ledger's URL and its backend's own settings
(`LEDGER_BACKEND_SETTINGS`) are checked by the backend as the ledger is built,
also before the port is bound (`LedgerOptionError`).
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, fields, replace
from pathlib import Path

from quota_sidecar.api.credentials import one_secret


class SettingsError(ValueError):
    pass


# Settings of one ledger backend or another, handed to the backend as they are: the
# backend checks them when the ledger is built, before the port is bound.
LEDGER_BACKEND_SETTINGS = ("sqlite_synchronous", "filter_fp_rate")


@dataclass(frozen=True)
class Settings:
    address: str = "127.0.0.1:50051"
    ledger: str = "sqlite:///./quota-ledger.db"
    metrics_address: str = "127.0.0.1:9464"
    admin_token: str | None = None
    admin_token_file: str | None = None
    tenants: str | None = None
    log_level: str = "INFO"
    drain_timeout: float = 10.0
    max_workers: int = 32
    max_message_bytes: int = 16 * 1024 * 1024
    sqlite_synchronous: str = "FULL"
    filter_fp_rate: float = 0.001
    metrics_tenant_min_ratio: float = 0.5
    metrics_tenant_max: int = 100
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_secret_file: str | None = None
    webhook_timeout: float = 5.0
    reminder_interval: float = 60.0
    max_pending_calls: int = 256
    ledger_check_interval: float = 0.5
    socket_group: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    request_retention: float = 86_400.0
    event_retention: float = 7 * 86_400.0
    audit_retention: float = 90 * 86_400.0
    prune_interval: float = 60.0
    keepalive_min_ping_interval: float = 1.0
    lease_ttl: float = 15.0

    def validate(self) -> Settings:
        """These settings with the secret files read in, once every value is checked."""
        return self._with_secret_files()._checked()

    def _with_secret_files(self) -> Settings:
        """The secrets read from their files, which are then done with (so validating the
        result again reads nothing)."""
        loaded: dict[str, str | None] = {}
        for secret, file in SECRET_FILES.items():
            try:
                loaded[secret] = one_secret(
                    _flag(secret), f"QUOTA_{secret.upper()}", getattr(self, secret), getattr(self, file)
                )
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
            loaded[file] = None
        return replace(self, **loaded)  # type: ignore[arg-type]

    def _checked(self) -> Settings:
        if self.address.startswith("unix:"):
            if not self.address.removeprefix("unix://").removeprefix("unix:"):
                raise SettingsError("--address: the unix socket path is empty")
        else:
            _host_port("--address", self.address)
        if self.metrics_address:
            _host_port("--metrics-address", self.metrics_address)
        if self.admin_token is not None and not self.admin_token.strip():
            raise SettingsError("--admin-token: must not be blank")
        if self.tenants and not Path(self.tenants).is_file():
            raise SettingsError(f"--tenants: no such file {self.tenants}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("--log-level: one of DEBUG, INFO, WARNING, ERROR")
        if self.drain_timeout < 0:
            raise SettingsError("--drain-timeout: must not be negative")
        if self.max_workers < 1:
            raise SettingsError("--max-workers: must be at least 1")
        if self.max_message_bytes < 1024:
            raise SettingsError("--max-message-bytes: must be at least 1024")
        if self.metrics_tenant_min_ratio < 0:
            raise SettingsError("--metrics-tenant-min-ratio: must not be negative")
        if self.metrics_tenant_max < 0:
            raise SettingsError("--metrics-tenant-max: must not be negative")
        if self.webhook_url is not None:
            parts = urllib.parse.urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(f"--webhook-url: expected an http:// or https:// URL, got {self.webhook_url!r}")
        if self.webhook_secret is not None and not self.webhook_url:
            raise SettingsError("--webhook-secret: needs --webhook-url")
        if self.webhook_timeout <= 0:
            raise SettingsError("--webhook-timeout: must be positive")
        if self.reminder_interval <= 0:
            raise SettingsError("--reminder-interval: must be positive")
        if self.max_pending_calls < 0:
            raise SettingsError("--max-pending-calls: must not be negative")
        for flag, seconds in (
            ("--request-retention", self.request_retention),
            ("--event-retention", self.event_retention),
            ("--audit-retention", self.audit_retention),
            ("--prune-interval", self.prune_interval),
        ):
            if not seconds > 0:
                raise SettingsError(f"{flag}: must be positive")
        if not self.lease_ttl > 0:
            raise SettingsError("--lease-ttl: must be positive")
        if not self.keepalive_min_ping_interval > 0:
            raise SettingsError("--keepalive-min-ping-interval: must be positive")
        if self.ledger_check_interval <= 0:
            raise SettingsError("--ledger-check-interval: must be positive")
        if self.socket_group is not None:
            if not self.address.startswith("unix:"):
                raise SettingsError("--socket-group: needs a unix:// --address")
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise SettingsError(f"--socket-group: no such group {self.socket_group!r}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("--tls-client-ca: needs --tls-cert and --tls-key")
        for flag, value in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        ):
            if value is not None and not Path(value).is_file():
                raise SettingsError(f"{flag}: no such file {value}")
        if self.tls_cert is not None and self.tls_key is not None:
            _check_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @property
    def ledger_backend(self) -> dict[str, object]:
        """The settings the ledger's backend reads and checks itself (`LedgerOptions.backend`)."""
        return {name: getattr(self, name) for name in LEDGER_BACKEND_SETTINGS}

    @property
    def wide_binds(self) -> list[str]:
        """The listening addresses reachable from beyond this machine (not loopback, not a unix socket)."""
        wide = []
        if not self.address.startswith("unix:") and not _loopback(_host_port("--address", self.address)[0]):
            wide.append(f"gRPC on {self.address}")
        if self.metrics_address and not _loopback(_host_port("--metrics-address", self.metrics_address)[0]):
            wide.append(f"metrics on {self.metrics_address}")
        return wide


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> bytes:
    """Stands in for OpenSSL's passphrase prompt, which would wait on the terminal."""
    raise _EncryptedKey


def _check_tls(cert: str, key: str, client_ca: str | None) -> None:
    """Loads the TLS files as the gRPC port will, so that a bad one is reported with its
    flag and cause here rather than as gRPC's "Failed to bind to address"."""
    _check_certificates("--tls-cert", cert)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise SettingsError(
            f"--tls-key: {key} is encrypted; the sidecar needs it unencrypted (protect the file instead)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SettingsError(f"--tls-key: {key} is not the private key of the certificate in {cert}") from None
        raise SettingsError(f"--tls-key: {key} holds no PEM private key") from None
    except OSError as exc:
        raise SettingsError(f"--tls-key: cannot read {key}: {exc.strerror}") from None
    if client_ca is not None:
        _check_certificates("--tls-client-ca", client_ca)


def _check_certificates(flag: str, path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise SettingsError(f"{flag}: {path} holds no PEM certificate") from None
        raise SettingsError(f"{flag}: {path} is not a valid PEM certificate") from None
    except OSError as exc:
        raise SettingsError(f"{flag}: cannot read {path}: {exc.strerror}") from None


SECRET_FILES = {"admin_token": "admin_token_file", "webhook_secret": "webhook_secret_file"}
"""The secret settings, and the settings naming a file to read each from instead."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def secrets_on_the_command_line(args: argparse.Namespace) -> list[str]:
    """The secret settings given as flags, where every user of the machine can read them."""
    return [_flag(secret) for secret in SECRET_FILES if getattr(args, secret, None) is not None]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{flag}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


HELP = {
    "address": "where gRPC listens: HOST:PORT or unix:///path/to.sock",
    "ledger": "the ledger: sqlite:///PATH or a bare file path (one sidecar), or postgresql://... (a fleet)",
    "metrics_address": "HOST:PORT serving Prometheus /metrics; empty to disable",
    "admin_token": "the admin credential (Bearer token); admin RPCs are refused without one",
    "admin_token_file": "a file holding the admin token (instead of --admin-token, which other users can read)",
    "tenants": "a YAML or JSON file of plans to load at start",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "drain_timeout": "seconds to finish in-flight calls on SIGTERM/SIGINT",
    "max_workers": "threads serving gRPC calls",
    "max_message_bytes": "largest gRPC request accepted",
    "sqlite_synchronous": "SQLite synchronous mode: FULL (default), EXTRA or NORMAL",
    "filter_fp_rate": "target false-positive rate of the dedupe filters",
    "metrics_tenant_min_ratio": "usage ratio from which a tenant gets its own limit-proximity series",
    "metrics_tenant_max": "most tenants given their own limit-proximity series (the most pressing first)",
    "webhook_url": "http(s) URL that receives every usage event as a JSON POST (at least once)",
    "webhook_secret": "key of the X-Quota-Signature-V1 and X-Quota-Signature HMAC-SHA256 of each webhook post",
    "webhook_secret_file": "a file holding the webhook secret (instead of --webhook-secret)",
    "webhook_timeout": "seconds one webhook post may take in all (connect, send, the whole answer)",
    "reminder_interval": "seconds between checks for due reminders (renotify_interval, AC-1)",
    "max_pending_calls": "calls that may wait for a free worker; beyond them a call gets RESOURCE_EXHAUSTED at once",
    "ledger_check_interval": "seconds between write attempts while the ledger fails, and checks that its file is there",
    "socket_group": "group given read and write access to the unix socket (mode 0660 instead of 0600)",
    "tls_cert": "PEM certificate chain of the gRPC port; with --tls-key, the port speaks TLS only",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; with it every client must present a certificate it signed (mutual TLS)",
    "request_retention": "seconds an answer is kept for retries of its request_id (then pruned)",
    "event_retention": "seconds a usage event is kept in the outbox once the webhook delivered it",
    "audit_retention": "seconds an audit row is kept",
    "prune_interval": "seconds between prunings of what is past its retention",
    "lease_ttl": (
        "seconds a sidecar holds the webhook's delivery and the reminder sweep unrenewed; when it stops"
        " renewing (killed), another sidecar of the fleet takes over after this"
    ),
    "keepalive_min_ping_interval": (
        "shortest interval in seconds between a client's keepalive pings, with or without calls;"
        " a client pinging more often is sent GOAWAY too_many_pings after two strikes"
    ),
}


def _convert(f: Field[object]) -> type:
    """The type a setting's text is read as (annotations are strings here)."""
    return {"int": int, "float": float}.get(str(f.type), str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            type=_convert(f),
            help=f"{HELP[f.name]} (env QUOTA_{f.name.upper()}; default {f.default!r})",
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags win over QUOTA_* variables, which win over the defaults."""
    values: dict[str, object] = {}
    for f in fields(Settings):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
            continue
        env = environ.get(f"QUOTA_{f.name.upper()}")
        if env is None:
            continue
        convert = _convert(f)
        try:
            values[f.name] = convert(env)
        except ValueError:
            raise SettingsError(f"QUOTA_{f.name.upper()}: not a valid {convert.__name__}: {env!r}") from None
    return Settings(**values).validate()  # type: ignore[arg-type]


def settings_from(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    parser = argparse.ArgumentParser(prog="quota-sidecar serve")
    add_arguments(parser)
    return resolve(parser.parse_args(list(argv)), environ)
