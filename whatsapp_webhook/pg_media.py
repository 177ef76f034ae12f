"""The media queue in PostgreSQL: the same behaviour as sqlite_media.py, for several workers and hosts."""

from __future__ import annotations

from whatsapp_webhook.pg_base import Connection, PostgresBase
from whatsapp_webhook.pg_schema import MEDIA_STORE_LOCK, OPEN_SQL, SCHEMA_KEY
from whatsapp_webhook.store_api import MediaJob, MediaJobState, MediaJobStatus


class PostgresMediaQueue(PostgresBase):
    @staticmethod
    def _prune_media(c: Connection) -> None:
        c.execute(
            "DELETE FROM media_jobs j WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.key = j.key"
            f" AND inbox.status IN {OPEN_SQL})"
        )

    def claim_media_jobs(self, owner: str, *, limit: int, lease_seconds: float) -> list[MediaJob]:
        """As sqlite_media: a read first, so an idle queue costs no write transaction per worker and second."""
        now = self.clock()
        due = self._run(
            lambda c: c.execute(
                "SELECT 1 FROM media_jobs WHERE (state = 'pending' AND next_attempt_at <= %s)"
                " OR (state = 'fetching' AND lease_expires_at < %s) LIMIT 1",
                (now, now),
            ).fetchone()
        )
        if due is None:
            return []

        def work(c: Connection) -> list[MediaJob]:
            rows = c.execute(
                "WITH due AS (SELECT key FROM media_jobs WHERE (state = 'pending' AND next_attempt_at <= %s)"
                " OR (state = 'fetching' AND lease_expires_at < %s) ORDER BY created_at LIMIT %s"
                " FOR UPDATE SKIP LOCKED)"
                " UPDATE media_jobs j SET state = 'fetching', attempts = j.attempts + 1, lease_owner = %s,"
                " lease_expires_at = %s, updated_at = %s FROM due WHERE j.key = due.key"
                " RETURNING j.key, j.url, j.mimetype, j.attempts",
                (now, now, limit, owner, now + lease_seconds, now),
            ).fetchall()
            return [MediaJob(key=k, url=u, mimetype=m, attempts=a) for k, u, m, a in rows]

        return self._write(work)

    def store_media_job(self, key: str, owner: str, *, mimetype: str, data: bytes, max_total_bytes: int) -> bool:
        now = self.clock()

        def work(c: Connection) -> bool:
            c.execute(f"SELECT pg_advisory_xact_lock({MEDIA_STORE_LOCK}, {SCHEMA_KEY})")  # one bound for all hosts
            row = c.execute("SELECT COALESCE(SUM(size), 0) FROM media").fetchone()
            fits = (int(row[0]) if row else 0) + len(data) <= max_total_bytes
            updated = c.execute(
                "UPDATE media_jobs SET state = %s, reason = %s, lease_owner = NULL, updated_at = %s"
                " WHERE key = %s AND lease_owner = %s AND state = 'fetching' RETURNING 1",
                ("stored" if fits else "failed", None if fits else "store_full", now, key, owner),
            ).fetchone()
            if updated is None or not fits:
                return False
            c.execute(
                "INSERT INTO media (key, mimetype, data, size, created_at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING",
                (key, mimetype, data, len(data), now),
            )
            return True

        return self._write(work)

    def fail_media_job(self, key: str, owner: str, *, reason: str, retry_in: float | None = None) -> None:
        now = self.clock()
        state = MediaJobState.PENDING if retry_in is not None else MediaJobState.FAILED
        self._write(
            lambda c: c.execute(
                "UPDATE media_jobs SET state = %s, reason = %s, lease_owner = NULL, next_attempt_at = %s,"
                " updated_at = %s WHERE key = %s AND lease_owner = %s AND state = 'fetching'",
                (str(state), reason, now + (retry_in or 0.0), now, key, owner),
            )
        )

    def media_job(self, key: str) -> MediaJobStatus | None:
        row = self._run(
            lambda c: c.execute(
                "SELECT j.state, j.reason, j.attempts, COALESCE(m.size, 0) FROM media_jobs j"
                " LEFT JOIN media m ON m.key = j.key WHERE j.key = %s",
                (key,),
            ).fetchone()
        )
        if row is None:
            return None
        return MediaJobStatus(state=MediaJobState(row[0]), reason=row[1], attempts=row[2], size=int(row[3]))
