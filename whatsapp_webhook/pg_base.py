"""The PostgreSQL plumbing under the state store: one connection pool per worker process, transactions that
turn every database failure into StoreUnavailable, and versioned migrations under an advisory lock."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from whatsapp_webhook.health import CheckStatus, HealthCheck
from whatsapp_webhook.pg_schema import (
    COUNTER_SHARDS,
    HEALTH_LOCK,
    MIGRATION_LOCK,
    MIGRATIONS,
    MIGRATIONS_TABLE_SQL,
    SCHEMA_KEY,
    SCHEMA_VERSION,
)
from whatsapp_webhook.settings import SettingsError, redact_url
from whatsapp_webhook.store_api import StoreUnavailable

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

IDLE_IN_TRANSACTION_SECONDS = 60  # a stopped process cannot hold row locks longer than this
MIGRATION_WAIT_SECONDS = 300  # how long a starting server waits for another one's migration
APPLICATION_NAME = "whatsapp_webhook"  # in pg_stat_activity; a worker's pool adds ":<pid>" (unless the URL names one)


def connection_info(url: str, *, timeout: float) -> str:
    """libpq's connection string for STATE_DB: the URL's own options (TLS, host lists, ...) win over ours.

    Ours: connect within `timeout`, end any statement after `timeout` (a hung database then costs a 503,
    not a thread) and name the application in pg_stat_activity.
    """
    try:
        given = pg_conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        raise SettingsError(
            f"STATE_DB {redact_url(url)} is not a valid PostgreSQL URL; the form is "
            "postgresql://user:password@host:5432/database?sslmode=require"
        ) from None
    ours: dict[str, Any] = {"connect_timeout": max(2, math.ceil(timeout)), "application_name": APPLICATION_NAME}
    options = (
        f"-c statement_timeout={int(timeout * 1000)} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_SECONDS * 1000}"
    )
    if given.get("options"):
        options += f" {given['options']}"  # later -c settings win: the URL's
    extra = {name: value for name, value in ours.items() if name not in given}
    return pg_conninfo.make_conninfo(url, **extra, options=options)


# What libpq says when the server is down, starting, stopping or out of reach: it may come back by itself.
# Anything else at connect time (a password, a database, TLS, pg_hba.conf) needs someone to fix STATE_DB.
TRANSIENT_CONNECT_ERRORS = (
    "connection refused",
    "timeout expired",
    "timed out",
    "could not translate host name",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
    "connection reset",
    "the database system is",  # starting up, shutting down, in recovery mode
    "too many clients",
    "terminating connection",
)


def unreachable(exc: psycopg.Error) -> bool:
    """The server could not be reached or is not taking connections yet, rather than it refused us."""
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and any(words in text for words in TRANSIENT_CONNECT_ERRORS)


# SQLSTATE classes and codes of a database in trouble rather than of a statement's values: connection (08),
# transaction rollback (40: deadlock, serialization), resources (53: disk, memory, connections), operator
# intervention (57: shutdown, statement timeout), system (58); a read-only database (25006: a standby after a
# failover, or a full disk on some services) and a lock not had in time (55P03).
TROUBLE_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
TROUBLE_SQLSTATES = ("25006", "55P03")


def database_trouble(exc: BaseException) -> bool:
    """A store call failed because of the database or the way to it (down, unreachable, too slow, a deadlock),
    not because of the values it was given: those would fail again, these may pass on a later try.

    By SQLSTATE: psycopg files some refused values under OperationalError too (54000, an index row too big).
    A failure with no SQLSTATE is the client's own (no connection, the pool's timeout)."""
    if not isinstance(exc, StoreUnavailable) or not isinstance(exc.__cause__, psycopg.Error):
        return False
    sqlstate = exc.__cause__.sqlstate
    if sqlstate is None:
        return isinstance(exc.__cause__, psycopg.OperationalError)
    return sqlstate[:2] in TROUBLE_SQLSTATE_CLASSES or sqlstate in TROUBLE_SQLSTATES


class PostgresBase:
    """A PostgreSQL database shared by every thread, worker and host.

    Each worker process has its own pool, opened on first use, after gunicorn forks: a pool's threads
    and sockets must never cross a fork, so the master only ever uses one-off connections it closes.
    Connections are in autocommit mode: a read is one statement; a write is BEGIN ... COMMIT.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        pooled: bool = True,
    ) -> None:
        self.url = url
        self.pooled = pooled  # False: a connection per call (the gunicorn master, which must fork clean)
        self.pool_size = pool_size
        self.timeout = timeout
        self.clock = clock
        self._conninfo = connection_info(url, timeout=timeout)
        self._named_by_url = pg_conninfo.conninfo_to_dict(self._conninfo)["application_name"] != APPLICATION_NAME
        self._pool: ConnectionPool[Connection] | None = None
        self._pool_pid: int | None = None
        self._pool_lock = threading.Lock()

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    # --- one-off connections: schema and start-up checks ---------------------------------------------

    def _connect_once(self) -> Connection:
        try:
            return psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._start_error(exc) from None

    def _start_error(self, exc: psycopg.Error) -> Exception:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if unreachable(exc):
            return StoreUnavailable(f"cannot reach the PostgreSQL server of STATE_DB {self.shown_url}: {reason}")
        return SettingsError(
            f"STATE_DB {self.shown_url} cannot be used ({reason}); check the URL's user, password, database "
            "and TLS options, and that the user may create tables there"
        )

    def initialize(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one migration per transaction.

        Several servers may start at once: the first takes the migration lock, the others wait for it and
        then find nothing left to do. The lock is the session's, so it dies with a killed migrator.
        Raises SettingsError when the database refuses us, StoreUnavailable when it cannot be reached.
        """
        connection = self._connect_once()
        try:
            connection.execute(f"SET statement_timeout = {MIGRATION_WAIT_SECONDS * 1000}")
            connection.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK}, {SCHEMA_KEY})")
            connection.execute(MIGRATIONS_TABLE_SQL)
            row = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise SettingsError(
                    f"STATE_DB {self.shown_url} was written by a newer release (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}): run that release, or point STATE_DB at another database"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                with connection.transaction():
                    connection.execute(MIGRATIONS[number - 1].encode())  # several statements, no parameters
                    connection.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)", (number, time.time())
                    )
        except psycopg.Error as exc:
            raise self._start_error(exc) from None
        finally:
            connection.close()  # also releases the migration lock

    def check_usable(self) -> None:
        """Connect once and make sure the server takes writes, without touching the schema (start-up check)."""
        try:
            connection = self._connect_once()
        except StoreUnavailable as exc:
            raise SettingsError(f"{exc}; start it, or fix the host and port in STATE_DB") from None
        try:
            row = connection.execute("SELECT pg_is_in_recovery()").fetchone()
            if row and row[0]:
                raise SettingsError(f"STATE_DB {self.shown_url} is a read-only standby: point it at the primary server")
        except psycopg.Error as exc:
            raise SettingsError(f"STATE_DB {self.shown_url} cannot be used ({exc})") from None
        finally:
            connection.close()

    def schema_version(self) -> int:
        row = self._run(lambda c: c.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone())
        return int(row[0]) if row else 0

    # --- the worker's pool and its transactions --------------------------------------------------------

    def _pool_here(self) -> ConnectionPool[Connection]:
        """This process's pool, opened without waiting for the server (an outage must not stop a worker)."""
        pool = self._pool
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                # A pool inherited through a fork is the parent's: its threads did not come along and its
                # sockets are not ours. It is dropped unclosed (psycopg never closes another process's).
                pool = ConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.timeout,
                    # Give up re-dialling soon: the next request dials again at once, so a database that
                    # comes back is used within one request instead of after a long backoff.
                    reconnect_timeout=max(2.0, self.timeout),
                    kwargs={"autocommit": True, **self._worker_name()},
                    name=f"state-{os.getpid()}",
                    open=False,
                )
                pool.open(wait=False)
                self._pool, self._pool_pid = pool, os.getpid()
            return self._pool

    def _worker_name(self) -> dict[str, str]:
        """Which worker holds a connection, for pg_stat_activity (and the bench's connections per worker)."""
        return {} if self._named_by_url else {"application_name": f"{APPLICATION_NAME}:{os.getpid()}"}

    def _run(self, work: Callable[[Connection], T], *, begin: str | None = None) -> T:
        """`work` on a pooled connection: alone in autocommit (reads, and writes of one statement, which is
        atomic by itself), or inside `begin` ... COMMIT (writes of several statements).

        A connection that died while idle in the pool (the server restarted) is not an outage: the pool's
        idle connections are checked and the work runs once more, which is safe because nothing was
        committed. (A one-statement write whose server died while committing it may have committed: its
        second run then finds it done, which each such write answers as a duplicate: nothing twice.)
        Every other database failure is StoreUnavailable, and the connection goes back clean.
        """
        if not self.pooled:
            try:
                connection = psycopg.connect(self._conninfo, autocommit=True)
            except psycopg.Error as exc:
                raise StoreUnavailable(f"state store error: {exc}") from exc
            try:
                if begin is not None:
                    connection.execute(begin)
                result = work(connection)
                if begin is not None:
                    connection.execute("COMMIT")
                return result
            except psycopg.Error as exc:
                raise StoreUnavailable(f"state store error: {exc}") from exc
            finally:
                connection.close()
        for attempt in (1, 2):
            pool = self._pool_here()
            try:
                connection = pool.getconn()
            except psycopg.Error as exc:
                raise StoreUnavailable(f"state store error: {exc}") from exc
            committing = False
            try:
                if begin is None:
                    return work(connection)
                # Pipelined: statements go out without waiting for each other's answers; only a result that
                # work() reads waits. BEGIN leaves with the first statement, COMMIT with the last ones.
                with connection.pipeline():
                    connection.execute(begin)
                    result = work(connection)
                    committing = True
                    connection.execute("COMMIT")
                return result
            except psycopg.Error as exc:
                self._rollback(connection)
                again = attempt == 1 and not committing
                if again and connection.broken:
                    pool.check()  # drop the other dead idle connections too
                    continue
                if again and isinstance(exc, (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)):
                    continue  # a deadlock or serialization failure: the server undid it all
                raise StoreUnavailable(f"state store error: {exc}") from exc
            except BaseException:
                self._rollback(connection)
                raise
            finally:
                pool.putconn(connection)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _write(self, work: Callable[[Connection], T]) -> T:
        return self._run(work, begin="BEGIN")

    @staticmethod
    def _rollback(connection: Connection) -> None:
        if connection.broken or connection.closed:
            return
        try:
            if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                connection.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the pool replaces a connection it finds broken

    def close(self) -> None:
        with self._pool_lock:
            pool, pid = self._pool, self._pool_pid
            self._pool = self._pool_pid = None
        if pool is not None and pid == os.getpid():
            pool.close()

    # --- counters and health -------------------------------------------------------------------------

    @staticmethod
    def _bump(c: Connection, name: str, amount: int = 1) -> None:
        """Add to a counter in this connection's shard (no other transaction is waiting for that row)."""
        c.execute(
            "INSERT INTO counters (name, shard, value) VALUES (%s, %s, %s)"
            " ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
            (name, c.info.backend_pid % COUNTER_SHARDS, amount),
        )

    @staticmethod
    def _count(c: Connection, sql: str, params: tuple[Any, ...] | list[Any] | Mapping[str, Any] = ()) -> int:
        """The one number a `WITH changed AS (... RETURNING 1) SELECT COUNT(*)` statement answers (a pipeline
        has no rowcount until it syncs; a result is asked for, so it does)."""
        row = c.execute(sql, params).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _bump_with_followers(c: Connection, update: str, params: tuple[Any, ...], *, counters: list[str]) -> None:
        """Run `update` (the merged messages of a burst finishing with their lead) and add 1 + the rows it
        changed to each of `counters`, in one statement: nothing to wait for before the COMMIT."""
        c.execute(
            f"WITH followers AS ({update} RETURNING 1)"
            " INSERT INTO counters (name, shard, value) SELECT name, %s, 1 + (SELECT COUNT(*) FROM followers)"
            " FROM unnest(%s::text[]) AS name"
            " ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
            (*params, c.info.backend_pid % COUNTER_SHARDS, counters),
        )

    def count(self, name: str, amount: int = 1) -> None:
        self._write(lambda c: self._bump(c, name, amount))

    def count_many(self, amounts: Mapping[str, int]) -> None:
        """Add several counters in one write (a worker's batch of rejected and ignored requests)."""
        if any(amounts.values()):
            self._write(lambda c: self._bump_many(c, amounts))

    @staticmethod
    def _bump_many(c: Connection, amounts: Mapping[str, int]) -> None:
        names = [name for name, amount in amounts.items() if amount]
        if names:
            c.execute(
                "INSERT INTO counters (name, shard, value)"
                " SELECT name, %s, amount FROM unnest(%s::text[], %s::bigint[]) AS batch (name, amount)"
                " ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
                (c.info.backend_pid % COUNTER_SHARDS, names, [amounts[name] for name in names]),
            )

    def ping(self) -> None:
        """A real write: a database that can be read but not written cannot take new messages."""
        self.count("health_checks")

    def set_health(self, name: str, status: CheckStatus, reason: str, *, max_parts: int = 200) -> None:
        """Record a part's state; `since` moves only when the status changes. New parts stop at `max_parts`."""
        now = self.clock()

        def work(c: Connection) -> None:
            part = name.split(":", 1)[0]
            if not c.execute("SELECT 1 FROM health WHERE name = %s", (name,)).fetchone():
                c.execute(f"SELECT pg_advisory_xact_lock({HEALTH_LOCK}, hashtext(%s))", (part,))
                row = c.execute(
                    "SELECT COUNT(*) FROM health WHERE name = %s OR name LIKE %s", (part, part + ":%")
                ).fetchone()
                if row and row[0] >= max_parts:
                    return
            c.execute(
                "INSERT INTO health (name, status, reason, since, updated_at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET since = CASE WHEN health.status = excluded.status"
                " THEN health.since ELSE excluded.since END, status = excluded.status,"
                " reason = excluded.reason, updated_at = excluded.updated_at",
                (name, str(status), reason[:500], now, now),
            )

        self._write(work)

    def health_reports(self) -> dict[str, HealthCheck]:
        rows = self._run(lambda c: c.execute("SELECT name, status, reason, since FROM health").fetchall())
        return {
            name: HealthCheck(status=CheckStatus(status), reason=reason, since=since)
            for name, status, reason, since in rows
        }
