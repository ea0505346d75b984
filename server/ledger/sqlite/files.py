"""The SQLite ledger's file: where it is, who holds it, and its self-healing.

`sqlite_path` reads the ledger's URL. `LedgerFile` holds an exclusive `flock` on the
database file itself, which keeps a second sidecar off the same ledger whatever name
reaches the file (a symlink, a hard link): the dedupe filters and the writer's
remembered rows are exact only while this process is the only writer, and a hard
link would even give the file a second WAL. It opens every connection to the file,
notices when the file or its WAL is removed underneath the sidecar, and writes the
ledger back whole from a connection that still holds it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from ...domain.errors import LedgerUnavailable

log = logging.getLogger("quota_sidecar.ledger")


def sqlite_path(url: str) -> Path:
    """The file behind `sqlite:///relative.db`, `sqlite:////abs.db` or a bare path."""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        if not rest:
            raise ValueError("the sqlite URL names no file")
        return Path(rest)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"unsupported ledger scheme {scheme!r}: use sqlite:///PATH or a file path")
    if not url:
        raise ValueError("the ledger path is empty")
    return Path(url)


FileId = tuple[int, int]


def _file_id(path: Path | str) -> FileId | None:
    """The (device, inode) naming a file, or None when nothing is at `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold(path: Path) -> int:
    """An open descriptor of the ledger file at `path` (created when missing) with an
    exclusive flock on it. The lock is on the file, not on a name, so a second sidecar
    reaching it through a symlink or a hard link meets it too. flock locks belong to
    the open file description and never touch the POSIX byte-range locks SQLite takes
    on the same file, so they neither conflict nor get dropped with them.

    Two sidecars creating the file at once open the same new file (O_CREAT alone) and
    one of them gets the lock. A name given to another file between the open and the
    lock (the holder writing the ledger back) is opened again. A new file is readable by
    its owner alone (0600): it holds every tenant's contact ids, and SQLite gives its -wal
    and -shm files the database's mode."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LedgerUnavailable(f"ledger {path} is in use by {holder}") from None
        except OSError:
            os.close(fd)
            raise
        if _file_id(path) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the flock on the file open at `fd`, from Linux's /proc/locks
    ("N: FLOCK ADVISORY WRITE pid major:minor:inode ...", device numbers in hex)."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # A pid of 0 is a holder outside this process's pid namespace.
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file and fields[4].isdigit():
                    if int(fields[4]) > 0:
                        return f"another sidecar (pid {fields[4]})"
    except OSError:
        pass
    return "another sidecar"


def _leave_legacy_lock(path: Path) -> None:
    """Earlier releases locked a `.lock` file beside the ledger instead of the ledger. One
    still running on this path (an upgrade under way) holds that lock, and this sidecar
    stays off; a lock file nobody holds is removed, so none is left beside the ledger."""
    legacy = Path(f"{path}.lock")
    try:
        fd = os.open(legacy, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LedgerUnavailable(f"ledger {path} is in use by {_holder(fd)}, through {legacy.name}") from None
        legacy.unlink(missing_ok=True)
    finally:
        os.close(fd)


class LedgerFile:
    """The ledger file at `path`, locked while held, and the connections to it."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        # Moves on each time the file is written back: connections made before are to the removed file.
        self.generation = 0
        self._wal = Path(f"{path}-wal")
        self._lock_fd: int | None = None
        self._ids: tuple[FileId | None, FileId | None] = (None, None)

    def hold(self) -> None:
        """Creates the file when missing and locks it; LedgerUnavailable when another sidecar holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _hold(self.path)

    def prepare(self) -> None:
        """Once held: refuses a sidecar of an earlier release still on this path, and makes a
        new file's name durable before anything is committed into it."""
        assert self._lock_fd is not None
        _leave_legacy_lock(self.path)
        if os.fstat(self._lock_fd).st_size == 0:
            _sync_dir(Path(os.path.realpath(self.path)).parent)

    def release(self) -> None:
        """Closes the locked descriptor; the caller closes its connections first, since closing
        any descriptor of the file drops the POSIX locks SQLite holds on it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def connect(self) -> sqlite3.Connection:
        """A connection to the existing ledger file (never creates one: a file removed
        underneath is written back by the writer, not replaced by an empty one)."""
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def remember(self) -> None:
        """Takes the file and WAL now at the path as the ones the writer holds."""
        self._ids = self._now()

    def _now(self) -> tuple[FileId | None, FileId | None]:
        return _file_id(self.path), _file_id(self._wal)

    def displaced(self) -> bool:
        """Whether the ledger file, or its WAL, is no longer the one the writer holds."""
        db, wal = self._now()
        return db != self._ids[0] or (self._ids[1] is not None and wal != self._ids[1])

    def write_back(self, source: sqlite3.Connection, move_to: Callable[[sqlite3.Connection], None]) -> str | None:
        """Under the writing lock: writes the whole ledger, as `source` (the writer's
        connection) still sees it, back to its path after the file or its WAL was removed,
        and hands a connection to the new file to `move_to`; returns why it could not.
        Refuses when another file now sits at the path: that may be an operator's restore,
        and is not overwritten."""
        found = _file_id(self.path)
        if found is not None and found != self._ids[0]:
            return f"ledger {self.path} was replaced by another file underneath the sidecar; restart to use that file"
        spare = self.path.with_name(self.path.name + ".restoring")
        try:
            spare.unlink(missing_ok=True)
            # Locked before it takes the ledger's name, so no second sidecar gets in between.
            fd = _hold(spare)
            try:
                target = sqlite3.connect(spare)
                try:
                    source.backup(target)
                finally:
                    target.close()
                for leftover in (self._wal, Path(f"{self.path}-shm")):
                    leftover.unlink(missing_ok=True)
                os.replace(spare, self.path)
                _sync_dir(self.path.parent)
                conn = self.connect()
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except BaseException:
                os.close(fd)
                raise
        except (OSError, sqlite3.Error, LedgerUnavailable) as exc:
            return f"ledger {self.path} was removed underneath the sidecar and cannot be written back yet: {exc}"
        move_to(conn)
        # The removed file has no name left to reach it by: the lock moves to the new one.
        assert self._lock_fd is not None
        os.close(self._lock_fd)
        self._lock_fd = fd
        self.generation += 1
        self.remember()
        log.warning("ledger %s was removed underneath the sidecar; written back whole from the open ledger", self.path)
        return None
