"""One command moves an SQLite state file into PostgreSQL, for the move from one host to several:

    python whatsapp_webhook_server.py --migrate-to-postgres postgresql://user:password@host:5432/database

Everything the server keeps moves, in one PostgreSQL transaction: messages in flight (queued, being
written, half sent, merged into a burst), history, chat state (pauses, opt-outs, limits), what was sent
(so echoes stay known as ours), media bytes, health reports and the counters. A message that was in
progress when the old server stopped is due at once on PostgreSQL; one caught mid-send keeps its
status, so the next server asks WAHA whether the part left before sending it again.

It refuses to run while a server uses the state file (it takes the server's own claim, ownership.py),
and into a database that already holds messages (checked under an advisory lock, so two migrations into
one database cannot both find it empty). The file is read under SQLite's write lock, held until the
file is renamed: a worker orphaned by a killed server cannot write after the reading.

The file is renamed to STATE_DB + ".migrating-to-postgresql" just before the PostgreSQL commit and to
".migrated-to-postgresql" after it (back to STATE_DB when the commit is refused). A crash at any point
leaves no usable full file on the STATE_DB path beside a full database, and the SQLite store refuses to
open STATE_DB while either name is beside it (sqlite_base.refuse_if_moved_to_postgres): a new empty file
on the old path would answer again whatever WAHA delivers to both stores.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.ownership import StateFileBusy, StateFileOwner
from whatsapp_webhook.settings import SettingsError, is_postgres_url, redact_url
from whatsapp_webhook.sqlite_base import MIGRATED_SUFFIX, MIGRATING_SUFFIX
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import OPEN_STATUSES, StoreUnavailable

if TYPE_CHECKING:
    from whatsapp_webhook.pg_base import Connection

__all__ = ["MIGRATED_SUFFIX", "MIGRATING_SUFFIX", "MigrationRefused", "MigrationReport", "migrate_to_postgres"]

# pg_advisory_xact_lock key of the migration (any fixed number: only migrations take it): "STATEMIG".
MIGRATION_LOCK_KEY = 0x535441544D4947
STATE_FILE_PARTS = ("", "-wal", "-shm")  # SQLite's file and its write-ahead log
BATCH_ROWS = 200  # rows per INSERT batch
MEDIA_BATCH_ROWS = 4  # media rows carry their bytes (a video may be megabytes): a few at a time
# Written by a server that was pointed at the new database before the move (a /health, a check): kept.
MERGEABLE_TABLES = ("counters", "health")
# The PostgreSQL side's own bookkeeping, never copied.
TARGET_ONLY_TABLES = ("schema_migrations",)


class MigrationRefused(Exception):
    """The migration did not start (or was undone); the message says why and what to do."""


@dataclass(frozen=True)
class MigrationReport:
    rows: dict[str, int]  # table -> rows copied
    open_messages: int  # unfinished messages, now PostgreSQL's to answer
    media_bytes: int
    kept_as: str  # where the SQLite file is now

    def lines(self) -> list[str]:
        copied = ", ".join(f"{table} {count}" for table, count in sorted(self.rows.items()))
        return [
            f"OK   copied: {copied}",
            f"OK   {self.open_messages} unfinished messages will be answered by the server on PostgreSQL",
            f"OK   {self.media_bytes} bytes of media",
            f"OK   the state file is kept as {self.kept_as} (no server should use it again)",
        ]


def migrate_to_postgres(state_db: str, url: str, *, timeout: float = 30.0) -> MigrationReport:
    """Copy the state file `state_db` into the PostgreSQL database `url`, then rename the file.

    Raises MigrationRefused (nothing changed) or SettingsError (the file or the database cannot be used).
    """
    if is_postgres_url(state_db):
        raise MigrationRefused(f"STATE_DB is already a PostgreSQL database ({redact_url(state_db)}): nothing to move")
    if not is_postgres_url(url):
        raise MigrationRefused("the target must be a postgresql:// URL, e.g. postgresql://user:password@host/db")
    if not os.path.isfile(state_db) or os.path.getsize(state_db) == 0:
        raise MigrationRefused(f"there is no state file at STATE_DB={state_db}: point STATE_DB at the server's file")
    owner = StateFileOwner(state_db)
    try:
        owner.acquire()  # held until the file is renamed: no server may start on it meanwhile
    except StateFileBusy as exc:
        raise MigrationRefused(f"{exc}; stop the server before migrating its state file") from None
    try:
        source = StateStore(state_db)
        source.initialize()  # an older release's file is brought to this release's schema first
        source.close()
        report = _copy(state_db, url, timeout=timeout)
        kept_as = state_db + MIGRATED_SUFFIX
        try:
            _rename_state_file(state_db + MIGRATING_SUFFIX, kept_as)
        except OSError as exc:
            raise SettingsError(
                f"everything was moved into {redact_url(url)}, but renaming {state_db + MIGRATING_SUFFIX} to "
                f"{kept_as} failed ({exc}): rename it by hand, then set STATE_DB to the database"
            ) from None
        return MigrationReport(report.rows, report.open_messages, report.media_bytes, kept_as)
    finally:
        owner.release()


def _rename_state_file(old: str, new: str) -> None:
    """Rename the file and its write-ahead log; on a failure, put back what was already renamed."""
    done: list[str] = []
    try:
        for suffix in STATE_FILE_PARTS:
            if os.path.exists(old + suffix):
                os.replace(old + suffix, new + suffix)
                done.append(suffix)
    except OSError:
        for suffix in reversed(done):
            os.replace(new + suffix, old + suffix)
        raise


def _copy(state_db: str, url: str, *, timeout: float) -> MigrationReport:
    """Copy everything in one PostgreSQL transaction; the file is at STATE_DB + MIGRATING_SUFFIX once it commits."""
    import psycopg

    from whatsapp_webhook.pg_base import connection_info
    from whatsapp_webhook.pg_store import PostgresStore

    target = PostgresStore(url, pooled=False, timeout=timeout)
    try:
        target.initialize()  # this release's schema (several servers may race for it: they wait)
    except (StoreUnavailable, SettingsError) as exc:
        # Its words name STATE_DB, which here is still the file: say which database is meant.
        reason = str(exc).replace("STATE_DB ", "the target database ", 1)
        hint = "; start it, or fix the URL" if isinstance(exc, StoreUnavailable) else ""
        raise SettingsError(reason + hint) from None
    migrating = state_db + MIGRATING_SUFFIX
    renamed = may_have_committed = False
    source = sqlite3.connect(state_db, timeout=timeout, isolation_level=None)
    try:
        # SQLite's write lock, held until the file is renamed: one consistent reading, and a worker orphaned
        # by a killed server (the claim in ownership.py is the master's) cannot write after it.
        source.execute("BEGIN IMMEDIATE")
        with psycopg.connect(connection_info(url, timeout=timeout)) as connection:  # one transaction: all or nothing
            connection.execute("SET LOCAL statement_timeout = 0")  # a big copy is not a hung database
            # Two migrations into one database: the second waits here, then finds it full.
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            report = _copy_tables(source, connection)
            _reset_leases(connection)
            try:
                _rename_state_file(state_db, migrating)
            except OSError as exc:
                raise SettingsError(f"renaming STATE_DB {state_db!r} failed, nothing was moved: {exc}") from None
            renamed = True
            try:
                connection.commit()
            except psycopg.Error as exc:
                if connection.broken:  # the commit's answer was lost: it may have happened
                    may_have_committed = True
                    raise SettingsError(
                        f"the connection to {redact_url(url)} broke during the commit ({exc}): the state file "
                        f"is kept as {migrating}; if the database holds the messages, set STATE_DB to it and "
                        f"delete that file, if it is empty, rename the file back to {state_db} and migrate again"
                    ) from None
                raise
            except BaseException:  # interrupted while the commit was on its way: it may have happened
                may_have_committed = True
                raise
            may_have_committed = True  # from here on, the file never goes back to STATE_DB
        return report
    except BaseException as exc:
        if renamed and not may_have_committed:
            _rename_state_file(migrating, state_db)  # the commit was refused: the file is still the state
        if isinstance(exc, psycopg.Error):
            raise SettingsError(f"copying into {redact_url(url)} failed, nothing was moved: {exc}") from None
        if isinstance(exc, sqlite3.Error):
            raise SettingsError(f"reading STATE_DB {state_db!r} failed, nothing was moved: {exc}") from None
        raise
    finally:
        source.close()


def _reset_leases(connection: Connection) -> None:
    """The old server's leases (messages and media downloads in progress) went with it: due at once here."""
    connection.execute(
        "UPDATE inbox SET lease_owner = NULL, lease_expires_at = 0 WHERE status IN ('processing', 'sending')"
    )
    has_media_jobs = connection.execute("SELECT to_regclass('media_jobs') IS NOT NULL").fetchone()
    if has_media_jobs and has_media_jobs[0]:
        connection.execute(
            "UPDATE media_jobs SET state = 'pending', lease_owner = NULL, lease_expires_at = 0,"
            " next_attempt_at = 0 WHERE state = 'fetching'"
        )


def _copy_tables(source: sqlite3.Connection, target: Connection) -> MigrationReport:
    target_columns = _target_columns(target)
    source_tables = [
        row[0]
        for row in source.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    for table in source_tables:
        if table not in target_columns and _has_rows(source, table):
            raise MigrationRefused(f"the state file's table {table!r} has no place in PostgreSQL in this release")
    for table in target_columns:
        if table not in MERGEABLE_TABLES and table in source_tables and _target_has_rows(target, table):
            raise MigrationRefused(
                f"the PostgreSQL database already holds data (table {table}): migrate into an empty database"
            )
    rows: dict[str, int] = {}
    for table in source_tables:
        if table in target_columns:
            rows[table] = _copy_table(source, target, table, target_columns[table])
    placeholders = ", ".join(f"'{status}'" for status in OPEN_STATUSES)
    open_row = source.execute(f"SELECT COUNT(*) FROM inbox WHERE status IN ({placeholders})").fetchone()
    media_row = source.execute("SELECT COALESCE(SUM(size), 0) FROM media").fetchone() if "media" in rows else (0,)
    return MigrationReport(rows=rows, open_messages=int(open_row[0]), media_bytes=int(media_row[0]), kept_as="")


def _target_columns(target: Connection) -> dict[str, dict[str, str | None]]:
    """table -> column -> data type; None for an identity column, which numbers itself (history.id, inbox.seq):
    rows go in the file's order, so the new numbers keep it (no table refers to another's numbers)."""
    columns: dict[str, dict[str, str | None]] = {}
    for table, column, data_type, identity in target.execute(
        "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns"
        " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
    ).fetchall():
        if table not in TARGET_ONLY_TABLES:
            columns.setdefault(table, {})[column] = None if identity == "YES" else data_type
    return columns


def _has_rows(source: sqlite3.Connection, table: str) -> bool:
    return bool(source.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}")').fetchone()[0])


def _target_has_rows(target: Connection, table: str) -> bool:
    row = target.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}")').fetchone()
    return bool(row and row[0])


def _copy_table(source: sqlite3.Connection, target: Connection, table: str, columns: dict[str, str | None]) -> int:
    """Copy one table in the file's order (rowid: arrival order, which the identity columns then keep)."""
    source_columns = [row[1] for row in source.execute(f'PRAGMA table_info("{table}")')]
    if table == "counters":  # one shard of PostgreSQL's sharded counters takes each total
        return _copy_rows(
            source.execute("SELECT name, value FROM counters ORDER BY name"),
            target,
            "INSERT INTO counters (name, shard, value) VALUES (%s, 0, %s) ON CONFLICT (name, shard)"
            " DO UPDATE SET value = counters.value + excluded.value",
            [str, int],
        )
    missing = [c for c in source_columns if c not in columns]
    if missing:
        raise MigrationRefused(f"the state file's columns {table}.{', '.join(missing)} have no place in PostgreSQL")
    shared = [c for c in source_columns if columns[c] is not None]
    names = ", ".join(f'"{c}"' for c in shared)
    values = ", ".join("%s" for _ in shared)
    conflict = " ON CONFLICT DO NOTHING" if table in MERGEABLE_TABLES else ""
    return _copy_rows(
        source.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid'),
        target,
        f'INSERT INTO "{table}" ({names}) VALUES ({values}){conflict}',
        [_converter(columns[c] or "") for c in shared],
        batch_rows=MEDIA_BATCH_ROWS if table == "media" else BATCH_ROWS,
    )


def _converter(data_type: str) -> Callable[[Any], Any]:
    if data_type == "boolean":
        return bool  # SQLite keeps 0/1
    if data_type == "bytea":
        return bytes
    return lambda value: value


def _copy_rows(
    cursor: sqlite3.Cursor,
    target: Connection,
    insert: str,
    converters: list[Callable[[Any], Any]],
    *,
    batch_rows: int = BATCH_ROWS,
) -> int:
    copied = 0
    for batch in _batches(cursor, batch_rows):
        rows = [
            tuple(None if value is None else convert(value) for convert, value in zip(converters, row, strict=True))
            for row in batch
        ]
        with target.cursor() as cur:
            cur.executemany(insert, rows)
        copied += len(rows)
    return copied


def _batches(cursor: sqlite3.Cursor, size: int) -> Iterator[list[tuple[Any, ...]]]:
    while batch := cursor.fetchmany(size):
        yield batch
