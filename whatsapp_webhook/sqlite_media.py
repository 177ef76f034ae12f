"""The media queue in the SQLite file: which messages' files are still to be downloaded, and their bytes.

A file is queued in the same transaction that records its message (StateStore.accept), so a crash or a
kill -9 between the two is impossible; workers download it under a lease (media_fetch.MediaFetcher), apart
from the reply queue, so a debounce or a reply backlog never makes WAHA's file expire first.
"""

from __future__ import annotations

import sqlite3

from whatsapp_webhook.events import IncomingMessage
from whatsapp_webhook.media import worth_downloading
from whatsapp_webhook.sqlite_base import SQLiteStore
from whatsapp_webhook.store_api import MediaJob, MediaJobState, MediaJobStatus, StoreUnavailable

DUE_MEDIA_SQL = (
    "SELECT 1 FROM media_jobs WHERE (state = 'pending' AND next_attempt_at <= ?)"
    " OR (state = 'fetching' AND lease_expires_at < ?) LIMIT 1"
)


class SQLiteMediaQueue(SQLiteStore):
    @staticmethod
    def _queue_media(c: sqlite3.Connection, message: IncomingMessage, now: float) -> None:
        """Inside accept's transaction: a message WAHA has a file for gets a download job (once per key)."""
        if not worth_downloading(message.media_url, message.media_mimetype):
            return
        c.execute(
            "INSERT INTO media_jobs (key, url, mimetype, state, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (message.dedupe_key, message.media_url, message.media_mimetype or "", now, now, now),
        )

    @staticmethod
    def _forget_media(c: sqlite3.Connection, key: str) -> None:
        """Inside finish's transaction: the reply is written, its bytes and jobs (and the burst's) go."""
        c.execute(
            "DELETE FROM media_jobs WHERE key = ? OR key IN (SELECT key FROM inbox WHERE merged_into = ?)", (key, key)
        )

    @staticmethod
    def _prune_media(c: sqlite3.Connection) -> None:
        c.execute(
            "DELETE FROM media_jobs WHERE key NOT IN (SELECT key FROM inbox WHERE status IN"
            " ('queued', 'processing', 'sending', 'merged'))"
        )

    def claim_media_jobs(self, owner: str, *, limit: int, lease_seconds: float) -> list[MediaJob]:
        """Take up to `limit` files to download: pending ones that are due, and those whose worker died.

        Every worker asks about once a second: a read first, so an idle queue costs no write lock.
        """
        now = self.clock()
        try:
            due = self._connection().execute(DUE_MEDIA_SQL, (now, now)).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store error: {exc}") from exc
        if due is None:
            return []

        def work(c: sqlite3.Connection) -> list[MediaJob]:
            rows = c.execute(
                "UPDATE media_jobs SET state = 'fetching', attempts = attempts + 1, lease_owner = ?,"
                " lease_expires_at = ?, updated_at = ? WHERE key IN (SELECT key FROM media_jobs"
                " WHERE (state = 'pending' AND next_attempt_at <= ?) OR (state = 'fetching' AND lease_expires_at < ?)"
                " ORDER BY created_at LIMIT ?) RETURNING key, url, mimetype, attempts",
                (owner, now + lease_seconds, now, now, now, limit),
            ).fetchall()
            return [MediaJob(key=k, url=u, mimetype=m, attempts=a) for k, u, m, a in rows]

        return self._transaction(work)

    def store_media_job(self, key: str, owner: str, *, mimetype: str, data: bytes, max_total_bytes: int) -> bool:
        """Keep the downloaded bytes, unless the store already holds MEDIA_STORE_MAX_BYTES (then the job fails
        with 'store_full'). False when the job is no longer this worker's (finished, or taken over)."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            held = c.execute("SELECT COALESCE(SUM(size), 0) FROM media").fetchone()[0]
            fits = held + len(data) <= max_total_bytes
            updated = c.execute(
                "UPDATE media_jobs SET state = ?, reason = ?, lease_owner = NULL, updated_at = ?"
                " WHERE key = ? AND lease_owner = ? AND state = 'fetching'",
                ("stored" if fits else "failed", None if fits else "store_full", now, key, owner),
            ).rowcount
            if not updated or not fits:
                return False
            c.execute(
                "INSERT INTO media (key, mimetype, data, size, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                (key, mimetype, data, len(data), now),
            )
            return True

        return self._transaction(work)

    def fail_media_job(self, key: str, owner: str, *, reason: str, retry_in: float | None = None) -> None:
        """The download failed: for good, or (retry_in) worth another try after that many seconds."""
        now = self.clock()
        state = MediaJobState.PENDING if retry_in is not None else MediaJobState.FAILED
        self._transaction(
            lambda c: c.execute(
                "UPDATE media_jobs SET state = ?, reason = ?, lease_owner = NULL, next_attempt_at = ?, updated_at = ?"
                " WHERE key = ? AND lease_owner = ? AND state = 'fetching'",
                (str(state), reason, now + (retry_in or 0.0), now, key, owner),
            )
        )

    def media_job(self, key: str) -> MediaJobStatus | None:
        try:
            row = (
                self._connection()
                .execute(
                    "SELECT j.state, j.reason, j.attempts, COALESCE(m.size, 0) FROM media_jobs j"
                    " LEFT JOIN media m ON m.key = j.key WHERE j.key = ?",
                    (key,),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store error: {exc}") from exc
        if row is None:
            return None
        return MediaJobStatus(state=MediaJobState(row[0]), reason=row[1], attempts=row[2], size=row[3])
