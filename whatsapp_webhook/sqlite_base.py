"""The SQLite plumbing under the state store: per-thread connections, transactions, the write gate."""

from __future__ import annotations

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
from whatsapp_webhook.settings import SettingsError
from whatsapp_webhook.store_api import StoreUnavailable
from whatsapp_webhook.store_schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    from whatsapp_webhook.concurrency import QueuedWrite

T = TypeVar("T")
_BUMP = (
    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
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

    def initialize(self) -> None:
        """Create the file and bring its schema to SCHEMA_VERSION; fail early with a clear message.

        Each migration runs in the transaction that also sets the new PRAGMA user_version, so a
        migration cut short leaves the file at the version before it, and runs again next time.
        """
        folder = os.path.dirname(os.path.abspath(self.path))
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
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(
                f"STATE_DB {self.path!r} cannot be used ({exc}); point STATE_DB at a writable file"
            ) from None

    def schema_version(self) -> int:
        return int(self._transaction(lambda c: c.execute("PRAGMA user_version").fetchone()[0], begin="BEGIN"))

    def check_usable(self) -> None:
        """Open the file for writing without touching the schema (that is for the server that owns it)."""
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
        # mode=rwc: fail when the file is not writable instead of quietly opening it read-only.
        uri = pathlib.Path(self.path).absolute().as_uri() + "?mode=rwc"
        connection = sqlite3.connect(
            uri, uri=True, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection = self._open()
            local.pid = os.getpid()
        connection: sqlite3.Connection = local.connection  # set by _open above, in this thread and process
        return connection

    def _transaction(self, work: Callable[[sqlite3.Connection], T], *, begin: str = "BEGIN IMMEDIATE") -> T:
        """Run `work` in a transaction of its own (reads) or as one atomic step of a group commit (writes).

        Reads ("BEGIN") run beside writers, as WAL allows; writes queue at the WriterGate.
        """
        if begin != "BEGIN":
            return self._writers.write(work, self._commit)
        connection: sqlite3.Connection | None = None
        try:
            connection = self._connection()
            connection.execute(begin)
            result = work(connection)
            connection.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            self._abandon(connection)
            raise StoreUnavailable(f"state store error: {exc}") from exc
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
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            for item in batch:
                connection.execute("SAVEPOINT one_write")
                try:
                    item.result = item.work(connection)
                except (
                    sqlite3.IntegrityError,
                    sqlite3.ProgrammingError,
                    sqlite3.InterfaceError,
                    sqlite3.DataError,
                ) as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = StoreUnavailable(f"state store error: {exc}")
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = exc
                connection.execute("RELEASE one_write")
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon(connection)
            for item in batch:
                item.result, item.error = None, StoreUnavailable(f"state store error: {exc}")
        except BaseException:
            self._abandon(connection)
            raise
        for item in batch:
            item.done = True

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
        rows = [(name, amount) for name, amount in amounts.items() if amount]
        if rows:
            self._transaction(lambda c: c.executemany(_BUMP, rows))

    def ping(self) -> None:
        """A real write: a store that can be read but not written cannot take new messages."""
        self.count("health_checks")

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
