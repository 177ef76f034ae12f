"""The state store's schema, its SQL for the inbox state machine, and the records it hands out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from whatsapp_webhook.events import IncomingMessage


class StoreUnavailable(Exception):
    """The state store could not be read or written."""


OPEN_STATUSES_SQL = "('queued', 'processing', 'sending', 'merged')"


@dataclass(frozen=True)
class Acceptance:
    """What the inbox did with a delivery: stored it, woke a failed one up for retry, or saw a duplicate."""

    stored: bool
    status: str
    attempts: int


@dataclass(frozen=True)
class ClaimedMessage:
    """A message this worker now owns until `lease_owner`'s lease runs out, with the burst merged into it."""

    message: IncomingMessage
    lease_owner: str
    previous_status: str  # 'sending' means an earlier attempt may already have sent (part of) the reply
    attempts: int
    reply_text: str | None
    outcome: str | None
    send_started_at: float | None
    received_at: float
    parts_sent: int = 0
    merged: tuple[IncomingMessage, ...] = ()

    @property
    def texts(self) -> list[str]:
        """What the customer wrote, in order: this message and the ones typed right after it."""
        return [m.text for m in (self.message, *self.merged) if m.text]


@dataclass(frozen=True)
class InboxEntry:
    status: str
    attempts: int
    outcome: str | None
    sent_message_id: str | None
    last_error: str | None
    merged_into: str | None


@dataclass(frozen=True)
class Admission:
    """Whether a chat may get a reply now; `notice` says the customer should be told once why not."""

    verdict: str  # ok | paused | opted_out | rate_limited | daily_cap | loop
    notice: bool = False


STORE_SCHEMA = """
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


IGNORED_COUNTER_PREFIX = "ignored."


LLM_COST_COUNTER = "llm_cost_nanousd"  # counters are integers: cost in billionths of a dollar


PAUSED_FOREVER = 1e12  # an operator's "/bot off" lasts until "/bot on"


ECHO_MIN_CHARS = 40


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
