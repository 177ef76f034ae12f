"""The SQLite plumbing under the state store: per-thread connections, transactions, the write gate."""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import (
    Callable,
    Mapping,
)
from typing import TYPE_CHECKING, TypeVar

from whatsapp_webhook.concurrency import WriterGate
from whatsapp_webhook.health import CheckStatus, HealthCheck
from whatsapp_webhook.logs import log
from whatsapp_webhook.settings import SettingsError
from whatsapp_webhook.store_api import StateFileLost, StoreFull, StoreUnavailable
from whatsapp_webhook.store_schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    from whatsapp_webhook.concurrency import QueuedWrite

T = TypeVar("T")
# Set by the gunicorn master (app.recover_after_restart) to the state file it opened, so every worker,
# including one started later, refuses a file that was deleted or replaced since (no split state).
STATE_FILE_ID_ENV = "WEBHOOK_STATE_FILE_ID"
IDENTITY_CHECK_SECONDS = 1.0  # how stale the "is it still our file?" answer of a read may be (writes: never)
SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode & 0xFF for "database or disk is full"
FULL_DISK_MEMORY_SECONDS = 10.0  # /health keeps saying "full" this long after a write was refused for space
PROBE_BYTES = 16 * 1024  # the probe write of ping(): a big message with its reply
PROBE_REUSE_SECONDS = 1.0  # a probe that passed this recently answers ping() without another write


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def pin_state_file(path: str) -> None:
    """Record, for the workers this process will fork, which file STATE_DB is now."""
    identity = file_identity(path)
    if identity is not None:
        os.environ[STATE_FILE_ID_ENV] = json.dumps({"path": os.path.abspath(path), "id": list(identity)})


def _pinned_identity(path: str) -> tuple[int, int] | None:
    try:
        pinned = json.loads(os.environ.get(STATE_FILE_ID_ENV) or "null")
        if pinned and pinned["path"] == os.path.abspath(path):
            return int(pinned["id"][0]), int(pinned["id"][1])
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    return None


def store_error(exc: sqlite3.Error) -> StoreUnavailable:
    """One mapping from SQLite's errors to the store's: a full disk is StoreFull (health names it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == SQLITE_FULL:
        return StoreFull(f"state store error: {exc}")
    return StoreUnavailable(f"state store error: {exc}")


_BUMP = (
    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


# --migrate-to-postgres renames the state file (state_migration.py): to MIGRATING_SUFFIX before its
# PostgreSQL commit, to MIGRATED_SUFFIX after. Either beside STATE_DB means the messages may be in PostgreSQL:
# a new empty file on the old path would answer a second time whatever WAHA delivers to both stores.
MIGRATING_SUFFIX = ".migrating-to-postgresql"
MIGRATED_SUFFIX = ".migrated-to-postgresql"


def refuse_if_moved_to_postgres(path: str) -> None:
    moved, moving = path + MIGRATED_SUFFIX, path + MIGRATING_SUFFIX
    if os.path.exists(moved):
        raise SettingsError(
            f"STATE_DB {path!r} was moved to PostgreSQL by --migrate-to-postgres: set STATE_DB to that "
            f"postgresql:// URL, or delete {moved} to start an empty state file"
        )
    if os.path.exists(moving):
        raise SettingsError(
            f"a --migrate-to-postgres of STATE_DB {path!r} was interrupted: if the PostgreSQL database holds "
            f"the messages, set STATE_DB to its postgresql:// URL and delete {moving}; if it is empty, rename "
            f"{moving} back to {path}"
        )


class SQLiteStore:
    """One SQLite file shared by every thread and gunicorn worker: reads run beside writers (WAL), writes
    queue at the WriterGate. Connections are per thread and per process: one must never cross a fork.
    """

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self._local = threading.local()
        self._writers = WriterGate(path + ".lock")
        # The file this store works on: a path that stops naming it makes every call StateFileLost.
        self._identity: tuple[int, int] | None = None
        self._identity_checked_at = float("-inf")
        self._identity_lost = False
        # An empty file beside the state file whose modification time says when a write of any worker was
        # last refused for lack of space (setting a time needs no free space; a row in the database would).
        self._full_marker = path + ".disk-full"
        self._probed_at = float("-inf")  # when ping's probe write last succeeded in this process

    def initialize(self) -> None:
        """Create the file and bring its schema to SCHEMA_VERSION; fail early with a clear message.

        Each migration runs in the transaction that also sets the new PRAGMA user_version, so a
        migration cut short leaves the file at the version before it, and runs again next time.
        """
        refuse_if_moved_to_postgres(self.path)
        folder = os.path.dirname(os.path.abspath(self.path))
        pinned = _pinned_identity(self.path)
        if pinned is not None:
            # A worker of a running server: the master opened the file; never create or adopt another one.
            self._identity = pinned
            self._check_identity(force=True)
        try:
            os.makedirs(folder, exist_ok=True)
            connection = self._open()
            try:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise SettingsError(
                        f"STATE_DB {self.path!r} was written by a newer release (schema {version}, this one "
                        f"knows {SCHEMA_VERSION}): run that release, or point STATE_DB at another file"
                    )
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    connection.executescript(
                        f"BEGIN IMMEDIATE;\n{MIGRATIONS[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;"
                    )
            finally:
                connection.close()
            if not os.path.exists(self._full_marker):
                with open(self._full_marker, "a"):
                    pass
                os.utime(self._full_marker, (0, 0))  # no write has been refused yet
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(
                f"STATE_DB {self.path!r} cannot be used ({exc}); point STATE_DB at a writable file"
            ) from None

    def schema_version(self) -> int:
        return int(self._transaction(lambda c: c.execute("PRAGMA user_version").fetchone()[0], begin="BEGIN"))

    def check_usable(self) -> None:
        """Open the file for writing without touching the schema (that is for the server that owns it)."""
        refuse_if_moved_to_postgres(self.path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            connection = self._open()
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(
                f"STATE_DB {self.path!r} cannot be used ({exc}); point STATE_DB at a writable file"
            ) from None

    def _open(self) -> sqlite3.Connection:
        # mode=rw(c): fail when the file is not writable instead of quietly opening it read-only. Only the
        # first open may create the file: once this store knows its file, a missing one is an error.
        self._check_identity(force=True)
        mode = "rwc" if self._identity is None else "rw"
        uri = pathlib.Path(self.path).absolute().as_uri() + f"?mode={mode}"
        connection = sqlite3.connect(
            uri, uri=True, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
        connection.execute("PRAGMA synchronous = NORMAL")
        if self._identity is None:
            self._identity = file_identity(self.path)
        return connection

    def _check_identity(self, *, force: bool = False) -> None:
        """Raise StateFileLost while the path no longer names the file this store opened (deleted, moved or
        replaced): writing on would put some messages in the old inode and some in a new file. Every commit and
        every new connection checks (`force`); reads at most every IDENTITY_CHECK_SECONDS while all is well,
        and every call once lost (so a file put back is taken up again at once)."""
        if self._identity is None:
            return
        now = time.monotonic()
        if not force and not self._identity_lost and now - self._identity_checked_at < IDENTITY_CHECK_SECONDS:
            return
        found = file_identity(self.path)
        self._identity_checked_at = now
        lost = found != self._identity
        if lost != self._identity_lost:
            self._identity_lost = lost
            if lost:
                what = "is gone (deleted or moved away)" if found is None else "was replaced by another file"
                log.error(
                    "the state file %s " + what + " while the server ran: new messages get 503 until it is put "
                    "back or the server is restarted (docs/problemas.md)",
                    self.path,
                )
            else:
                log.warning("the state file %s is back: the store takes writes again", self.path)
        if lost:
            raise StateFileLost(f"state file {self.path} was deleted or replaced while the server ran")

    def _connection(self) -> sqlite3.Connection:
        self._check_identity()
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection = self._open()
            local.pid = os.getpid()
        connection: sqlite3.Connection = local.connection  # set by _open above, in this thread and process
        return connection

    def _transaction(
        self, work: Callable[[sqlite3.Connection], T], *, begin: str = "BEGIN IMMEDIATE", solo: bool = False
    ) -> T:
        """Run `work` in a transaction of its own (reads, and `solo` writes) or as one atomic step of a group
        commit (writes).

        Reads ("BEGIN") run beside writers, as WAL allows; writes queue at the WriterGate. A solo write takes
        SQLite's write lock itself: for a write that may fail for lack of room (the /health probe), which in
        a group commit would fail every write beside it (on SQLITE_FULL SQLite ends the whole transaction).
        """
        if begin != "BEGIN" and not solo:
            return self._writers.write(work, self._commit)
        connection: sqlite3.Connection | None = None
        try:
            connection = self._connection()
            connection.execute(begin)
            result = work(connection)
            connection.execute("COMMIT")
            if solo:
                self._check_identity(force=True)
            return result
        except sqlite3.Error as exc:
            self._abandon(connection)
            raise self._failure(exc) from exc
        except BaseException:
            self._abandon(connection)
            raise

    def _commit(self, batch: list[QueuedWrite]) -> None:
        """The writes in one IMMEDIATE transaction, in queue order, each in a savepoint.

        A write that fails on its own (a bug, or SQLite refusing that statement: a constraint, a bad
        parameter) is undone alone and its caller gets the error; the others commit. A failure of
        the database itself (I/O, full disk, corruption) fails the whole batch: StoreUnavailable.
        """
        connection: sqlite3.Connection | None = None
        try:
            # Every commit looks (a stat costs microseconds, a commit far more): no write goes to a lost file.
            self._check_identity(force=True)
            connection = self._connection()
        except StoreUnavailable as exc:  # the state file is gone: every write of the batch gets that answer
            for item in batch:
                item.result, item.error, item.done = None, exc, True
            return
        try:
            connection.execute("BEGIN IMMEDIATE")
            for item in batch:
                connection.execute("SAVEPOINT one_write")
                try:
                    result = item.work(connection)
                    if isinstance(result, sqlite3.Cursor):
                        # A cursor belongs to this, the leading thread's, connection. Handed to the waiting thread
                        # it would be cleaned up there while this thread goes on using the connection: SQLite then
                        # answers "bad parameter or other API misuse" to whichever write is running.
                        result.close()
                        result = None
                    item.result = result
                except (
                    sqlite3.IntegrityError,
                    sqlite3.ProgrammingError,
                    sqlite3.InterfaceError,
                    sqlite3.DataError,
                ) as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = self._failure(exc)
                except sqlite3.Error:
                    raise  # the database itself (I/O, full: SQLite then ends the whole transaction)
                except Exception as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = exc
                connection.execute("RELEASE one_write")
            connection.execute("COMMIT")
            # The file may have gone while BEGIN IMMEDIATE waited for another process: then this commit went to
            # the lost file, and its callers must not answer 2xx for it.
            self._check_identity(force=True)
        except StateFileLost as exc:
            self._abandon(connection)
            for item in batch:
                item.result, item.error = None, exc
        except sqlite3.Error as exc:
            self._abandon(connection)
            failure = self._failure(exc)
            for item in batch:
                item.result, item.error = None, failure
        except BaseException:
            self._abandon(connection)
            raise
        for item in batch:
            item.done = True

    def _failure(self, exc: sqlite3.Error) -> StoreUnavailable:
        failure = store_error(exc)
        if isinstance(failure, StoreFull):
            try:
                os.utime(self._full_marker)
            except OSError:
                pass  # the marker is gone: this worker's /health still answers from its own probe write
        return failure

    def _abandon(self, connection: sqlite3.Connection | None) -> None:
        """Roll back and drop the connection: after an I/O error SQLite may refuse to work on it again."""
        if connection is None:
            return
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            connection.close()
        except sqlite3.Error:
            pass
        self._local.pid = None  # the next call on this thread opens a fresh connection

    @staticmethod
    def _bump(connection: sqlite3.Connection, name: str, amount: int = 1) -> None:
        connection.execute(_BUMP, (name, amount))

    def count(self, name: str, amount: int = 1) -> None:
        self._transaction(lambda c: self._bump(c, name, amount))

    def count_many(self, amounts: Mapping[str, int]) -> None:
        """Add several counters in one write (a worker's batch of rejected and ignored requests)."""
        if any(amounts.values()):
            self._transaction(lambda c: self._bump_many(c, amounts))

    @staticmethod
    def _bump_many(connection: sqlite3.Connection, amounts: Mapping[str, int]) -> None:
        connection.executemany(_BUMP, [(name, amount) for name, amount in amounts.items() if amount])

    def ping(self) -> None:
        """Can the store take a message now? A real write the size of a big message (inserted and deleted in
        one step, so the file needs room for it, as an accepted message would), and no "disk full" answer to
        any write of this process in the last FULL_DISK_MEMORY_SECONDS: a nearly full disk can let the small
        counter updates through while every new message fails."""
        try:
            since = time.time() - os.stat(self._full_marker).st_mtime
        except OSError:
            since = float("inf")
        if 0 <= since < FULL_DISK_MEMORY_SECONDS:
            raise StoreFull(f"a write failed {since:.0f} s ago: database or disk is full")

        self._check_identity(force=True)  # a lost file shows at once, whatever a recent probe said
        if time.monotonic() - self._probed_at < PROBE_REUSE_SECONDS:
            return  # /health and /metrics are open to anyone: one probe write a second per worker is enough

        def probe(c: sqlite3.Connection) -> None:
            self._bump(c, "health_checks")
            c.execute(
                "INSERT INTO health (name, status, reason, since, updated_at) VALUES"
                " ('probe', 'ok', zeroblob(?), 0, 0)",
                (PROBE_BYTES,),
            )
            c.execute("DELETE FROM health WHERE name = 'probe'")

        self._transaction(probe, solo=True)
        self._probed_at = time.monotonic()

    def set_health(self, name: str, status: CheckStatus, reason: str, *, max_parts: int = 200) -> None:
        """Record a part's state; `since` moves only when the status changes. New parts stop at `max_parts`."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> None:
            part = name.split(":", 1)[0]
            known = c.execute("SELECT 1 FROM health WHERE name = ?", (name,)).fetchone()
            if (
                not known
                and c.execute(
                    "SELECT COUNT(*) FROM health WHERE name = ? OR name LIKE ?", (part, part + ":%")
                ).fetchone()[0]
                >= max_parts
            ):
                return
            c.execute(
                "INSERT INTO health (name, status, reason, since, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET since = CASE WHEN health.status = excluded.status"
                " THEN health.since ELSE excluded.since END, status = excluded.status,"
                " reason = excluded.reason, updated_at = excluded.updated_at",
                (name, str(status), reason[:500], now, now),
            )

        self._transaction(work)

    def health_reports(self) -> dict[str, HealthCheck]:
        """Every recorded part state, by name."""
        rows = self._transaction(
            lambda c: c.execute("SELECT name, status, reason, since FROM health").fetchall(), begin="BEGIN"
        )
        return {
            name: HealthCheck(status=CheckStatus(status), reason=reason, since=since)
            for name, status, reason, since in rows
        }

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local = threading.local()
