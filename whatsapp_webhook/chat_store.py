"""The state store, chat side: history, pauses, opt-outs, admission (limits, loops) and /stats reports."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from whatsapp_webhook.events import bare_message_id, text_fingerprint
from whatsapp_webhook.sqlite_base import SQLiteStore
from whatsapp_webhook.store_schema import (
    ECHO_MIN_CHARS,
    OPEN_STATUSES_SQL,
    Admission,
)


class ChatStore(SQLiteStore):
    """Per-chat state and reporting; every decision is one atomic step of a write transaction."""

    # --- conversation and chat policy ------------------------------------------------------------

    def history(self, chat_key: str, *, since: float, limit: int) -> list[tuple[str, str]]:
        """The chat's latest turns, oldest first."""
        rows = self._transaction(
            lambda c: c.execute(
                "SELECT role, content FROM history WHERE chat_key = ? AND created_at >= ? ORDER BY id DESC LIMIT ?",
                (chat_key, since, limit),
            ).fetchall(),
            begin="BEGIN",
        )
        return [(role, content) for role, content in reversed(rows)]

    def clear_history(self, chat_key: str) -> None:
        self._transaction(lambda c: c.execute("DELETE FROM history WHERE chat_key = ?", (chat_key,)))

    def pause_chat(self, chat_key: str, *, until: float, reason: str) -> None:
        """Stop answering a chat until `until` (0 resumes it)."""
        self._transaction(
            lambda c: c.execute(
                "INSERT INTO chat_state (chat_key, paused_until, pause_reason) VALUES (?, ?, ?) ON CONFLICT (chat_key)"
                # Resuming (0) always wins; otherwise the later pause wins, so a reply typed by a person
                # cannot shorten an operator's open-ended "/bot off".
                " DO UPDATE SET paused_until = CASE WHEN excluded.paused_until = 0 OR excluded.paused_until"
                " > paused_until THEN excluded.paused_until ELSE paused_until END, pause_reason = CASE WHEN"
                " excluded.paused_until = 0 THEN NULL WHEN excluded.paused_until > paused_until"
                " THEN excluded.pause_reason ELSE pause_reason END",
                (chat_key, until, reason if until else None),
            )
        )

    def set_opted_out(self, chat_key: str, opted_out: bool) -> bool:
        """Record the customer's choice; returns whether the chat is paused right now."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            c.execute(
                "INSERT INTO chat_state (chat_key, opted_out) VALUES (?, ?) ON CONFLICT (chat_key)"
                " DO UPDATE SET opted_out = excluded.opted_out",
                (chat_key, int(opted_out)),
            )
            return bool(
                c.execute(
                    "SELECT 1 FROM chat_state WHERE chat_key = ? AND paused_until > ?", (chat_key, now)
                ).fetchone()
            )

        return self._transaction(work)

    def known_sent_ids(self, message_ids: list[str]) -> set[str]:
        """Which of these WAHA message ids (bare form) we already recorded as ours."""
        bare = [b for b in map(bare_message_id, message_ids) if b]
        if not bare:
            return set()
        marks = ",".join("?" * len(bare))
        return {
            row[0]
            for row in self._transaction(
                lambda c: c.execute(f"SELECT bare_id FROM sent WHERE bare_id IN ({marks})", bare).fetchall(),
                begin="BEGIN",
            )
        }

    def is_our_message(self, chat_key: str, *, message_id: str | None, text: str | None, within: float) -> bool:
        """Did this server send it? By WAHA's message id, or by the same words to the same chat just now."""
        since = self.clock() - within

        def work(c: sqlite3.Connection) -> bool:
            bare = bare_message_id(message_id)
            if bare and c.execute("SELECT 1 FROM sent WHERE bare_id = ?", (bare,)).fetchone():
                return True
            fingerprint = text_fingerprint(text)
            return bool(
                fingerprint
                and c.execute(
                    "SELECT 1 FROM sent WHERE chat_key = ? AND text_hash = ? AND sent_at >= ?",
                    (chat_key, fingerprint, since),
                ).fetchone()
            )

        return self._transaction(work, begin="BEGIN")

    def admit(
        self,
        chat_key: str,
        *,
        texts: list[str],
        per_minute: int,
        per_day: int,
        loop_repeats: int,
        loop_window: float,
        loop_pause: float,
    ) -> Admission:
        """Decide, in the chat's turn, whether it gets an answer: pause, opt-out, loops, then rate limits.

        A merged burst counts once (it costs one LLM call). Replies beyond a limit still count, so a
        flood cannot reset its own window, and the polite notice goes out at most once an hour.
        """
        now = self.clock()
        today = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")

        def work(c: sqlite3.Connection) -> Admission:
            c.execute("INSERT INTO chat_state (chat_key) VALUES (?) ON CONFLICT (chat_key) DO NOTHING", (chat_key,))
            paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at = c.execute(
                "SELECT paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at"
                " FROM chat_state WHERE chat_key = ?",
                (chat_key,),
            ).fetchone()
            if paused_until > now:
                return Admission("paused")
            if opted_out:
                return Admission("opted_out")
            if self._looks_like_a_loop(c, chat_key, texts, since=now - loop_window, repeats=loop_repeats):
                c.execute(
                    "UPDATE chat_state SET paused_until = ?, pause_reason = 'loop' WHERE chat_key = ?",
                    (now + loop_pause, chat_key),
                )
                return Admission("loop")
            if now - minute_start >= 60:
                minute_start, minute_count = now, 0
            if day != today:
                day, day_count = today, 0
            minute_count, day_count = minute_count + 1, day_count + 1
            verdict = "daily_cap" if day_count > per_day else "rate_limited" if minute_count > per_minute else "ok"
            notice = verdict != "ok" and now - notice_at >= 3600
            c.execute(
                "UPDATE chat_state SET minute_start = ?, minute_count = ?, day = ?, day_count = ?,"
                " notice_at = ? WHERE chat_key = ?",
                (minute_start, minute_count, day, day_count, now if notice else notice_at, chat_key),
            )
            return Admission(verdict, notice)

        return self._transaction(work)

    @staticmethod
    def _looks_like_a_loop(
        c: sqlite3.Connection, chat_key: str, texts: list[str], *, since: float, repeats: int
    ) -> bool:
        """Another bot, not a person: the same message over and over, or our own longer reply echoed back."""
        for text in texts:
            fingerprint = text_fingerprint(text)
            same = c.execute(
                "SELECT COUNT(*) FROM inbox WHERE chat_key = ? AND text_hash = ? AND received_at >= ?"
                " AND merged_into IS NULL",
                (chat_key, fingerprint, since),
            ).fetchone()[0]
            # Short words ("ok", "obrigado") are echoed by people all the time; a paragraph is not.
            echoed = (
                len(text) >= ECHO_MIN_CHARS
                and c.execute(
                    "SELECT 1 FROM sent WHERE chat_key = ? AND text_hash = ? AND sent_at >= ?",
                    (chat_key, fingerprint, since),
                ).fetchone()
            )
            if same >= repeats or echoed:
                return True
        return False

    # --- reporting -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters, unfinished messages and chat states, read in one (non-locking) transaction."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> dict[str, Any]:
            counters = dict(c.execute("SELECT name, value FROM counters").fetchall())
            by_status = dict(
                c.execute(
                    f"SELECT status, COUNT(*) FROM inbox WHERE status IN {OPEN_STATUSES_SQL} GROUP BY status"
                ).fetchall()
            )
            retrying = c.execute(
                "SELECT COUNT(*) FROM inbox WHERE status = 'queued' AND last_error IS NOT NULL"
            ).fetchone()[0]
            paused = dict(
                c.execute(
                    "SELECT pause_reason, COUNT(*) FROM chat_state WHERE paused_until > ? GROUP BY pause_reason", (now,)
                ).fetchall()
            )
            opted_out = c.execute("SELECT COUNT(*) FROM chat_state WHERE opted_out = 1").fetchone()[0]
            return {
                "counters": counters,
                "by_status": by_status,
                "retrying": retrying,
                "paused": paused,
                "opted_out": opted_out,
            }

        return self._transaction(work, begin="BEGIN")
