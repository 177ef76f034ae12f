"""The state store, chat side: history, pauses, opt-outs, admission (limits, loops) and /stats reports."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import replace

from whatsapp_webhook.customer_data import (
    FORGOTTEN_CHAT,
    ChatExport,
    ForgetReport,
    message_row,
    scrubbed_message,
)
from whatsapp_webhook.events import bare_message_id, text_fingerprint
from whatsapp_webhook.policy import (
    ADMISSION_STATE_COLUMNS,
    LoopEvidence,
    Pause,
    decide_admission_from_state,
    later_pause,
)
from whatsapp_webhook.sqlite_base import SQLiteStore
from whatsapp_webhook.store_api import (
    OPEN_STATUSES,
    Admission,
    AdmissionRequest,
    ChatLimits,
    ClaimedMessage,
    StoreSnapshot,
    Turn,
    Verdict,
)

OPEN_STATUSES_SQL = "(" + ", ".join(f"'{status}'" for status in OPEN_STATUSES) + ")"


class ChatStore(SQLiteStore):
    """Per-chat state and reporting; every decision is one atomic step of a write transaction."""

    # --- conversation and chat policy ------------------------------------------------------------

    def history(self, chat_key: str, *, since: float, limit: int) -> list[Turn]:
        """The chat's latest turns, oldest first."""
        return self._transaction(lambda c: self._history_in(c, chat_key, since=since, limit=limit), begin="BEGIN")

    @staticmethod
    def _history_in(c: sqlite3.Connection, chat_key: str, *, since: float, limit: int) -> list[Turn]:
        rows = c.execute(
            "SELECT role, content FROM history WHERE chat_key = ? AND created_at >= ? ORDER BY id DESC LIMIT ?",
            (chat_key, since, limit),
        ).fetchall()
        return [Turn(role=role, content=content) for role, content in reversed(rows)]

    def clear_history(self, chat_key: str) -> None:
        self._transaction(lambda c: c.execute("DELETE FROM history WHERE chat_key = ?", (chat_key,)))

    def pause_chat(self, chat_key: str, *, until: float, reason: str) -> None:
        """Stop answering a chat until `until` (0 resumes it); policy.later_pause decides what stands."""

        def work(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT paused_until, pause_reason FROM chat_state WHERE chat_key = ?", (chat_key,)
            ).fetchone()
            current = Pause(until=row[0], reason=row[1]) if row else Pause(until=0, reason=None)
            pause = later_pause(current, until=until, reason=reason)
            c.execute(
                "INSERT INTO chat_state (chat_key, paused_until, pause_reason) VALUES (?, ?, ?) ON CONFLICT (chat_key)"
                " DO UPDATE SET paused_until = excluded.paused_until, pause_reason = excluded.pause_reason",
                (chat_key, pause.until, pause.reason),
            )

        self._transaction(work)

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

    def admit(self, chat_key: str, *, texts: list[str], limits: ChatLimits) -> Admission:
        """Decide, in the chat's turn, whether it gets an answer: pause, opt-out, loops, then rate limits.

        The decisions are policy's pure functions; loading their inputs and saving their results happen
        in this one write transaction, so two workers cannot both pass a limit.
        """
        now = self.clock()
        return self._transaction(lambda c: self._admit_in(c, chat_key, texts=texts, limits=limits, now=now))

    def _admit_in(
        self, c: sqlite3.Connection, chat_key: str, *, texts: list[str], limits: ChatLimits, now: float
    ) -> Admission:
        """admit's decision and its writes, inside the caller's write transaction (admit's own, or a claim's)."""
        c.execute("INSERT INTO chat_state (chat_key) VALUES (?) ON CONFLICT (chat_key) DO NOTHING", (chat_key,))
        state = c.execute(
            f"SELECT {ADMISSION_STATE_COLUMNS} FROM chat_state WHERE chat_key = ?", (chat_key,)
        ).fetchone()
        decision = decide_admission_from_state(
            state,
            evidence=lambda: self._loop_evidence(c, chat_key, texts, since=now - limits.loop_window),
            now=now,
            limits=limits,
        )
        if decision.loop_pause_until is not None:
            c.execute(
                "UPDATE chat_state SET paused_until = ?, pause_reason = 'loop' WHERE chat_key = ?",
                (decision.loop_pause_until, chat_key),
            )
        if (saved := decision.window) is not None:
            c.execute(
                "UPDATE chat_state SET minute_start = ?, minute_count = ?, day = ?, day_count = ?,"
                " notice_at = ? WHERE chat_key = ?",
                (saved.minute_start, saved.minute_count, saved.day, saved.day_count, saved.notice_at, chat_key),
            )
        return decision.admission

    def _admitted(
        self, c: sqlite3.Connection, claimed: ClaimedMessage, request: AdmissionRequest | None, *, now: float
    ) -> ClaimedMessage:
        """`claimed` with the admission its dispatcher asked for decided, and its history read, in the claim's
        transaction: what admit and history would answer, one write transaction and one thread hop less."""
        if request is None:
            return claimed
        chat_key = claimed.message.chat_key
        admission = self._admit_in(c, chat_key, texts=request.texts, limits=request.limits, now=now)
        history: tuple[Turn, ...] = ()
        if admission.verdict is Verdict.OK and request.history_turns:
            since = now - request.history_seconds
            history = tuple(self._history_in(c, chat_key, since=since, limit=request.history_turns))
        return replace(claimed, admission=admission, history=history)

    def mark_once(self, chat_key: str, name: str, value: str) -> bool:
        """Set the chat's mark `name` to `value`; True only for the one caller that changed it (once per value)."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            changed = c.execute(
                "INSERT INTO chat_marks (chat_key, name, value, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (chat_key, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
                " WHERE chat_marks.value != excluded.value",
                (chat_key, name, value, now),
            ).rowcount
            return bool(changed)

        return self._transaction(work)

    def read_counters(self, names: Iterable[str]) -> dict[str, int]:
        """These counters' totals (0 for one never counted), read without taking the write lock."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._transaction(
            lambda c: c.execute(f"SELECT name, value FROM counters WHERE name IN ({marks})", wanted).fetchall(),
            begin="BEGIN",
        )
        return {name: 0 for name in wanted} | dict(rows)

    @staticmethod
    def _loop_evidence(c: sqlite3.Connection, chat_key: str, texts: list[str], *, since: float) -> list[LoopEvidence]:
        evidence = []
        for text in texts:
            fingerprint = text_fingerprint(text)
            repeats = c.execute(
                "SELECT COUNT(*) FROM inbox WHERE chat_key = ? AND text_hash = ? AND received_at >= ?"
                " AND merged_into IS NULL",
                (chat_key, fingerprint, since),
            ).fetchone()[0]
            ours = c.execute(
                "SELECT 1 FROM sent WHERE chat_key = ? AND text_hash = ? AND sent_at >= ?",
                (chat_key, fingerprint, since),
            ).fetchone()
            evidence.append(LoopEvidence(chars=len(text), repeats_in_window=repeats, matches_our_reply=bool(ours)))
        return evidence

    # --- a customer's data on request (LGPD) -----------------------------------------------------

    def export_chat(self, chat_key: str) -> ChatExport:
        """Every row about one chat, from every table, read in one transaction."""

        def work(c: sqlite3.Connection) -> ChatExport:
            messages = [
                message_row(
                    key=row[0],
                    status=row[1],
                    outcome=row[2],
                    message_json=row[3],
                    reply_text=row[4],
                    sent_message_id=row[5],
                    last_error=row[6],
                    received_at=row[7],
                    finished_at=row[8],
                )
                for row in c.execute(
                    "SELECT key, status, outcome, message, reply_text, sent_message_id, last_error, received_at,"
                    " finished_at FROM inbox WHERE chat_key = ? ORDER BY sort_ts, rowid",
                    (chat_key,),
                )
            ]
            state = c.execute(
                "SELECT paused_until, pause_reason, opted_out, day, day_count FROM chat_state WHERE chat_key = ?",
                (chat_key,),
            ).fetchone()
            return ChatExport(
                chat_key=chat_key,
                messages=messages,
                history=[
                    {"role": role, "content": content, "created_at": created_at}
                    for role, content, created_at in c.execute(
                        "SELECT role, content, created_at FROM history WHERE chat_key = ? ORDER BY id", (chat_key,)
                    )
                ],
                chat_state=None
                if state is None
                else {
                    "paused_until": state[0],
                    "pause_reason": state[1],
                    "opted_out": bool(state[2]),
                    "day": state[3],
                    "messages_today": state[4],
                },
                marks=dict(c.execute("SELECT name, value FROM chat_marks WHERE chat_key = ?", (chat_key,)).fetchall()),
                media=[
                    {"key": key, "mimetype": mimetype, "size": size, "created_at": created_at}
                    for key, mimetype, size, created_at in c.execute(
                        "SELECT key, mimetype, size, created_at FROM media"
                        " WHERE key IN (SELECT key FROM inbox WHERE chat_key = ?) ORDER BY created_at",
                        (chat_key,),
                    )
                ],
                downloads=[
                    {"key": key, "url": url, "mimetype": mimetype, "state": state, "reason": reason}
                    for key, url, mimetype, state, reason in c.execute(
                        "SELECT key, url, mimetype, state, reason FROM media_jobs"
                        " WHERE key IN (SELECT key FROM inbox WHERE chat_key = ?) ORDER BY created_at",
                        (chat_key,),
                    )
                ],
                sent=[
                    {"sent_message_id": bare_id, "sent_at": sent_at}
                    for bare_id, sent_at in c.execute(
                        "SELECT bare_id, sent_at FROM sent WHERE chat_key = ? ORDER BY sent_at", (chat_key,)
                    )
                ],
            )

        return self._transaction(work, begin="BEGIN")

    def forget_chat(self, chat_key: str) -> ForgetReport:
        """Delete the chat from every table in one write; finished messages keep only a key with nothing personal."""

        def work(c: sqlite3.Connection) -> ForgetReport:
            # Deleted rows are overwritten with zeros, not left in the file's free pages (kept on afterwards:
            # pruning then wipes what it deletes too).
            c.execute("PRAGMA secure_delete = ON")
            deleted = {
                "chat_state": c.execute("DELETE FROM chat_state WHERE chat_key = ?", (chat_key,)).rowcount,
                "media": c.execute(
                    "DELETE FROM media WHERE key IN (SELECT key FROM inbox WHERE chat_key = ?)", (chat_key,)
                ).rowcount,
                "media_jobs": c.execute(
                    "DELETE FROM media_jobs WHERE key IN (SELECT key FROM inbox WHERE chat_key = ?)", (chat_key,)
                ).rowcount,
                "history": c.execute("DELETE FROM history WHERE chat_key = ?", (chat_key,)).rowcount,
                "chat_marks": c.execute("DELETE FROM chat_marks WHERE chat_key = ?", (chat_key,)).rowcount,
                "sent": c.execute("DELETE FROM sent WHERE chat_key = ?", (chat_key,)).rowcount,
            }
            dropped = c.execute(
                f"DELETE FROM inbox WHERE chat_key = ? AND status IN {OPEN_STATUSES_SQL}", (chat_key,)
            ).rowcount
            kept = c.execute(
                "SELECT key, message, sent_message_id FROM inbox WHERE chat_key = ?", (chat_key,)
            ).fetchall()
            c.executemany(
                "UPDATE inbox SET chat_key = ?, message = ?, text_hash = NULL, reply_text = NULL, merged = NULL,"
                " last_error = NULL, sent_message_id = ? WHERE key = ?",
                [
                    (FORGOTTEN_CHAT, scrubbed_message(message), bare_message_id(sent), key)
                    for key, message, sent in kept
                ],
            )
            deleted["inbox"] = dropped
            return ForgetReport(deleted=deleted, kept_keys=len(kept), dropped_open=dropped)

        report = self._transaction(work)
        # The WAL still holds the pages as they were before: copy the wiped ones into the file and empty it.
        # A reader in another process can hold the WAL for a moment; then SQLite's own checkpoint does it later.
        try:
            self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        return report

    # --- reporting -------------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """Counters, unfinished messages and chat states, read in one (non-locking) transaction."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> StoreSnapshot:
            return StoreSnapshot(
                counters=dict(c.execute("SELECT name, value FROM counters").fetchall()),
                by_status=dict(
                    c.execute(
                        f"SELECT status, COUNT(*) FROM inbox WHERE status IN {OPEN_STATUSES_SQL} GROUP BY status"
                    ).fetchall()
                ),
                retrying=c.execute(
                    "SELECT COUNT(*) FROM inbox WHERE status = 'queued' AND last_error IS NOT NULL"
                ).fetchone()[0],
                paused=dict(
                    c.execute(
                        "SELECT pause_reason, COUNT(*) FROM chat_state WHERE paused_until > ? GROUP BY pause_reason",
                        (now,),
                    ).fetchall()
                ),
                opted_out=c.execute("SELECT COUNT(*) FROM chat_state WHERE opted_out = 1").fetchone()[0],
                media_bytes=c.execute("SELECT COALESCE(SUM(size), 0) FROM media").fetchone()[0],
                chats=c.execute("SELECT COUNT(*) FROM chat_state").fetchone()[0],
            )

        return self._transaction(work, begin="BEGIN")
