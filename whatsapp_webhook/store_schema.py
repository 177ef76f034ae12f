"""The SQLite state file's schema, its versioned migrations and the SQL of the inbox state machine."""

from __future__ import annotations

# Release 1.0.0 and 1.1.0 files have no schema version (user_version 0); migration 1 creates or
# completes that schema (every statement is IF NOT EXISTS), so both upgrade in place.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS inbox (
    key TEXT PRIMARY KEY,
    chat_key TEXT NOT NULL,
    sort_ts REAL NOT NULL,
    message TEXT NOT NULL,
    text_hash TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL NOT NULL DEFAULT 0,
    merged_into TEXT,
    merged TEXT,
    outcome TEXT,
    reply_text TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    sent_message_id TEXT,
    last_error TEXT,
    send_started_at REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS inbox_by_status ON inbox (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS inbox_by_chat ON inbox (chat_key, sort_ts);
CREATE INDEX IF NOT EXISTS inbox_open_by_chat ON inbox (chat_key, status, received_at);
CREATE INDEX IF NOT EXISTS inbox_by_finish ON inbox (finished_at);
CREATE INDEX IF NOT EXISTS inbox_by_merge ON inbox (merged_into);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_key TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_chat ON history (chat_key, id);
CREATE INDEX IF NOT EXISTS history_by_age ON history (created_at);
CREATE TABLE IF NOT EXISTS chat_state (
    chat_key TEXT PRIMARY KEY,
    paused_until REAL NOT NULL DEFAULT 0,
    pause_reason TEXT,
    opted_out INTEGER NOT NULL DEFAULT 0,
    minute_start REAL NOT NULL DEFAULT 0,
    minute_count INTEGER NOT NULL DEFAULT 0,
    day TEXT NOT NULL DEFAULT '',
    day_count INTEGER NOT NULL DEFAULT 0,
    notice_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sent (
    chat_key TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    bare_id TEXT,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_by_chat ON sent (chat_key, text_hash);
CREATE INDEX IF NOT EXISTS sent_by_id ON sent (bare_id);
CREATE INDEX IF NOT EXISTS sent_by_age ON sent (sent_at);
CREATE TABLE IF NOT EXISTS health (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Media bytes (voice notes, photos) kept until their message is finished or pruned.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS media (
    key TEXT PRIMARY KEY,
    mimetype TEXT NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""

# The media queue: one row per message whose file is to be downloaded (sqlite_media.py).
SCHEMA_MEDIA_JOBS = """
CREATE TABLE IF NOT EXISTS media_jobs (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    mimetype TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS media_jobs_due ON media_jobs (state, next_attempt_at);
"""

# Per-chat marks (Store.mark_once): the out-of-hours notice goes once per chat and closed period.
SCHEMA_CHAT_MARKS = """
CREATE TABLE IF NOT EXISTS chat_marks (
    chat_key TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (chat_key, name)
);
"""

# MIGRATIONS[n - 1] takes a file from schema version n - 1 to n (PRAGMA user_version). Append only:
# a released migration never changes, so every older state file takes the same path.
# Release 1.2: how many times a message's reply went to sendText (REPLY_MAX_SENDS bounds it).
SCHEMA_V3 = """
ALTER TABLE inbox ADD COLUMN sends INTEGER NOT NULL DEFAULT 0;
"""

MIGRATIONS = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_MEDIA_JOBS, SCHEMA_CHAT_MARKS)
SCHEMA_VERSION = len(MIGRATIONS)

IGNORED_COUNTER_PREFIX = "ignored."
LLM_COST_COUNTER = "llm_cost_nanousd"  # counters are integers: cost in billionths of a dollar


# The earliest message of its chat that is due, whose chat has no other reply in progress
# and whose burst is over (no message in the last DEBOUNCE_SECONDS, or the burst is old enough).
# Order within a chat is the customer's send time, then arrival (rowid); a reply that already
# reached the customer in part is finished before anything else in its chat.
NEXT_DUE_SQL = """
SELECT m.key FROM inbox m
WHERE m.status IN ('queued', 'processing', 'sending')
  AND ((m.status = 'queued' AND m.next_attempt_at <= :now
        AND (m.received_at <= :burst_limit OR NOT EXISTS (
            SELECT 1 FROM inbox q WHERE q.chat_key = m.chat_key AND q.status = 'queued'
              AND q.received_at > :quiet_since)))
       OR (m.status != 'queued' AND m.lease_expires_at < :now))
  AND NOT EXISTS (
      SELECT 1 FROM inbox o
      WHERE o.chat_key = m.chat_key AND o.key != m.key AND o.status IN ('queued', 'processing', 'sending')
        AND ((o.status != 'queued' AND o.lease_expires_at >= :now)
             OR (m.status != 'sending' AND m.parts_sent = 0
                 AND (o.status = 'sending' OR o.parts_sent > 0
                      OR o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.rowid < m.rowid)))))
ORDER BY m.sort_ts, m.rowid
LIMIT :limit
"""


EARLIER_OPEN_SQL = """
SELECT 1 FROM inbox o, inbox m
WHERE m.key = :key AND o.chat_key = m.chat_key AND o.key != m.key AND o.status IN ('queued', 'processing', 'sending')
  AND (o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.rowid < m.rowid))
LIMIT 1
"""
