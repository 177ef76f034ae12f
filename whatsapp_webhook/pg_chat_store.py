"""The PostgreSQL state store, chat side: history, pauses, opt-outs, admission (limits, loops) and /stats."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from itertools import accumulate
from typing import Any

from whatsapp_webhook.customer_data import (
    FORGOTTEN_CHAT,
    ChatExport,
    ForgetReport,
    message_row,
    scrubbed_message,
)
from whatsapp_webhook.events import bare_message_id, text_fingerprint
from whatsapp_webhook.pg_base import Connection, PostgresBase
from whatsapp_webhook.pg_schema import CLAIM_LOCK, OPEN_SQL, SCHEMA_KEY
from whatsapp_webhook.policy import (
    ADMISSION_STATE_COLUMNS,
    LoopEvidence,
    Pause,
    RateWindow,
    decide_admission_from_state,
    later_pause,
)
from whatsapp_webhook.store_api import (
    Admission,
    AdmissionRequest,
    ChatLimits,
    ClaimedMessage,
    StoreSnapshot,
    Turn,
    Verdict,
)

# Makes sure the chat's row exists and locks it, in one statement (an upsert takes the row lock): whoever
# decides about this chat next waits for this transaction.
LOCK_CHAT_SQL = (
    "INSERT INTO chat_state (chat_key) VALUES (%s)"
    " ON CONFLICT (chat_key) DO UPDATE SET chat_key = excluded.chat_key RETURNING {columns}"
)
# The same for several chats at once, in key order, with what an admission reads.
LOCK_CHATS_SQL = (
    "INSERT INTO chat_state (chat_key) SELECT unnest(%s::text[]) ON CONFLICT (chat_key)"
    " DO UPDATE SET chat_key = excluded.chat_key"
    f" RETURNING chat_key, {ADMISSION_STATE_COLUMNS}"
)


class PostgresChatStore(PostgresBase):
    """Per-chat state and reporting. Each decision reads its inputs with the chat's row locked
    (SELECT ... FOR UPDATE) and saves its result in the same transaction: two workers, on any host,
    decide about one chat one after the other."""

    def history(self, chat_key: str, *, since: float, limit: int) -> list[Turn]:
        """The chat's latest turns, oldest first."""
        rows = self._run(
            lambda c: c.execute(
                "SELECT role, content FROM history WHERE chat_key = %s AND created_at >= %s ORDER BY id DESC LIMIT %s",
                (chat_key, since, limit),
            ).fetchall()
        )
        return [Turn(role=role, content=content) for role, content in reversed(rows)]

    def clear_history(self, chat_key: str) -> None:
        self._write(lambda c: c.execute("DELETE FROM history WHERE chat_key = %s", (chat_key,)))

    @staticmethod
    def _lock_chat(c: Connection, chat_key: str, columns: str) -> tuple[Any, ...]:
        row = c.execute(LOCK_CHAT_SQL.format(columns=columns), (chat_key,)).fetchone()
        assert row is not None  # an upsert always returns its row
        return row

    def pause_chat(self, chat_key: str, *, until: float, reason: str) -> None:
        """Stop answering a chat until `until` (0 resumes it); policy.later_pause decides what stands."""

        def work(c: Connection) -> None:
            paused_until, pause_reason = self._lock_chat(c, chat_key, "paused_until, pause_reason")
            current = Pause(until=float(paused_until), reason=pause_reason)
            pause = later_pause(current, until=until, reason=reason)
            c.execute(
                "UPDATE chat_state SET paused_until = %s, pause_reason = %s WHERE chat_key = %s",
                (pause.until, pause.reason, chat_key),
            )

        self._write(work)

    def set_opted_out(self, chat_key: str, opted_out: bool) -> bool:
        """Record the customer's choice; returns whether the chat is paused right now."""
        now = self.clock()

        def work(c: Connection) -> bool:
            row = c.execute(
                "INSERT INTO chat_state (chat_key, opted_out) VALUES (%s, %s) ON CONFLICT (chat_key)"
                " DO UPDATE SET opted_out = excluded.opted_out RETURNING paused_until",
                (chat_key, opted_out),
            ).fetchone()
            return bool(row and row[0] > now)

        return self._write(work)

    def known_sent_ids(self, message_ids: list[str]) -> set[str]:
        """Which of these WAHA message ids (bare form) we already recorded as ours."""
        bare = [b for b in map(bare_message_id, message_ids) if b]
        if not bare:
            return set()
        rows = self._run(lambda c: c.execute("SELECT bare_id FROM sent WHERE bare_id = ANY(%s)", (bare,)).fetchall())
        return {row[0] for row in rows}

    def is_our_message(self, chat_key: str, *, message_id: str | None, text: str | None, within: float) -> bool:
        """Did this server send it? By WAHA's message id, or by the same words to the same chat just now."""
        since = self.clock() - within
        bare = bare_message_id(message_id)
        fingerprint = text_fingerprint(text)
        if not bare and not fingerprint:
            return False
        row = self._run(
            lambda c: c.execute(
                "SELECT EXISTS (SELECT 1 FROM sent WHERE bare_id = %s) OR EXISTS (SELECT 1 FROM sent"
                " WHERE chat_key = %s AND text_hash = %s AND sent_at >= %s)",
                (bare or None, chat_key, fingerprint or None, since),
            ).fetchone()
        )
        return bool(row and row[0])

    def admit(self, chat_key: str, *, texts: list[str], limits: ChatLimits) -> Admission:
        """Decide, in the chat's turn, whether it gets an answer: pause, opt-out, loops, then rate limits.

        The decisions are policy's pure functions; their inputs are read with the chat's row locked and
        their results saved before the lock goes, so two workers cannot both pass a limit.
        """
        now = self.clock()
        return self._write(lambda c: self._admit_chats(c, [(chat_key, texts, limits)], now=now))[0]

    def _admit_chats(
        self, c: Connection, wanted: list[tuple[str, list[str], ChatLimits]], *, now: float
    ) -> list[Admission]:
        """admit's decision for each (chat, texts, limits), inside the caller's transaction (admit's own, or a
        claim's for its whole batch): three statements however many chats, as each is a round trip."""
        chats = {chat for chat, _, _ in wanted}
        if len(chats) != len(wanted):  # a claim takes one message per chat; admit() decides one chat
            raise ValueError("one admission per chat in a batch")
        state = {row[0]: row[1:] for row in c.execute(LOCK_CHATS_SQL, (sorted(chats),)).fetchall()}
        evidence = self._loop_evidence(c, [(chat, texts, now - limits.loop_window) for chat, texts, limits in wanted])
        admissions: list[Admission] = []
        pauses: dict[str, float] = {}
        windows: dict[str, RateWindow] = {}
        for (chat_key, _, limits), found in zip(wanted, evidence, strict=True):
            decision = decide_admission_from_state(
                state[chat_key], evidence=partial(list, found), now=now, limits=limits
            )
            if decision.loop_pause_until is not None:
                pauses[chat_key] = decision.loop_pause_until
            if decision.window is not None:
                windows[chat_key] = decision.window
            admissions.append(decision.admission)
        # Nothing waits for these: they leave with the COMMIT (pipeline mode).
        if pauses:
            c.execute(
                "UPDATE chat_state SET paused_until = p.until, pause_reason = 'loop'"
                " FROM unnest(%s::text[], %s::float8[]) AS p(chat, until) WHERE chat_key = p.chat",
                (list(pauses), [float(until) for until in pauses.values()]),
            )
        if windows:
            saved = list(windows.values())
            c.execute(
                "UPDATE chat_state SET minute_start = w.minute_start, minute_count = w.minute_count, day = w.day,"
                " day_count = w.day_count, notice_at = w.notice_at"
                " FROM unnest(%s::text[], %s::float8[], %s::int[], %s::text[], %s::int[], %s::float8[])"
                " AS w(chat, minute_start, minute_count, day, day_count, notice_at) WHERE chat_key = w.chat",
                (
                    list(windows),
                    [float(w.minute_start) for w in saved],
                    [w.minute_count for w in saved],
                    [w.day for w in saved],
                    [w.day_count for w in saved],
                    [float(w.notice_at) for w in saved],
                ),
            )
        return admissions

    def _admitted(
        self,
        c: Connection,
        claimed: list[ClaimedMessage],
        requests: list[AdmissionRequest | None],
        *,
        now: float,
    ) -> list[ClaimedMessage]:
        """The claimed messages with the admissions their dispatcher asked for decided, and the admitted
        chats' history read, in the claim's transaction: one transaction and pool checkout less per reply,
        and a handful of statements per batch (the claim holds CLAIM_LOCK meanwhile)."""
        asked = [(one, request) for one, request in zip(claimed, requests, strict=True) if request is not None]
        if not asked:
            return claimed
        admissions = self._admit_chats(
            c, [(one.message.chat_key, request.texts, request.limits) for one, request in asked], now=now
        )
        decided = {one.message.dedupe_key: admission for (one, _), admission in zip(asked, admissions, strict=True)}
        turns = self._histories(
            c,
            [
                (one.message.chat_key, now - request.history_seconds, request.history_turns)
                for one, request in asked
                if decided[one.message.dedupe_key].verdict is Verdict.OK and request.history_turns
            ],
        )
        return [
            replace(one, admission=admission, history=tuple(turns.get(one.message.chat_key, ())))
            if (admission := decided.get(one.message.dedupe_key)) is not None
            else one
            for one in claimed
        ]

    @staticmethod
    def _histories(c: Connection, wants: list[tuple[str, float, int]]) -> dict[str, list[Turn]]:
        """Each (chat, since, limit)'s latest turns, oldest first, in one statement."""
        if not wants:
            return {}
        rows = c.execute(
            "SELECT w.chat, h.role, h.content FROM unnest(%s::text[], %s::float8[], %s::int[]) AS w(chat, since, lim)"
            " CROSS JOIN LATERAL (SELECT id, role, content FROM history WHERE chat_key = w.chat"
            " AND created_at >= w.since ORDER BY id DESC LIMIT w.lim) AS h ORDER BY w.chat, h.id",
            ([chat for chat, _, _ in wants], [float(since) for _, since, _ in wants], [limit for _, _, limit in wants]),
        ).fetchall()
        turns: dict[str, list[Turn]] = {}
        for chat, role, content in rows:
            turns.setdefault(chat, []).append(Turn(role=role, content=content))
        return turns

    def mark_once(self, chat_key: str, name: str, value: str) -> bool:
        """Set the chat's mark `name` to `value`; True only for the one caller that changed it (once per value)."""
        now = self.clock()

        def work(c: Connection) -> bool:
            row = c.execute(
                "INSERT INTO chat_marks (chat_key, name, value, updated_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (chat_key, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
                " WHERE chat_marks.value <> excluded.value RETURNING 1",
                (chat_key, name, value, now),
            ).fetchone()
            return row is not None

        return self._write(work)

    def read_counters(self, names: Iterable[str]) -> dict[str, int]:
        """These counters' totals (0 for one never counted), summed over their shards."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        rows = self._run(
            lambda c: c.execute(
                "SELECT name, SUM(value) FROM counters WHERE name = ANY(%s) GROUP BY name", (wanted,)
            ).fetchall()
        )
        return {name: 0 for name in wanted} | {name: int(total) for name, total in rows}

    @staticmethod
    def _loop_evidence(c: Connection, bursts: list[tuple[str, list[str], float]]) -> list[list[LoopEvidence]]:
        """For each (chat, texts, since), each text's repeats in the window and whether we sent it: one statement."""
        asked = [(chat, text, since) for chat, texts, since in bursts for text in texts]
        rows = (
            c.execute(
                "SELECT (SELECT COUNT(*) FROM inbox WHERE chat_key = t.chat AND text_hash = t.hash"
                " AND received_at >= t.since AND merged_into IS NULL),"
                " EXISTS (SELECT 1 FROM sent WHERE chat_key = t.chat AND text_hash = t.hash AND sent_at >= t.since)"
                " FROM unnest(%s::text[], %s::text[], %s::float8[]) WITH ORDINALITY AS t(chat, hash, since, n)"
                " ORDER BY t.n",
                (
                    [chat for chat, _, _ in asked],
                    [text_fingerprint(text) for _, text, _ in asked],
                    [float(since) for _, _, since in asked],
                ),
            ).fetchall()
            if asked
            else []
        )
        evidence = [
            LoopEvidence(chars=len(text), repeats_in_window=repeats, matches_our_reply=bool(ours))
            for (_, text, _), (repeats, ours) in zip(asked, rows, strict=True)
        ]
        ends = list(accumulate(len(texts) for _, texts, _ in bursts))
        return [evidence[end - len(texts) : end] for (_, texts, _), end in zip(bursts, ends, strict=True)]

    # --- reporting -------------------------------------------------------------------------------

    # --- a customer's data on request (LGPD) -----------------------------------------------------

    def export_chat(self, chat_key: str) -> ChatExport:
        """Every row about one chat, from every table, read in one transaction."""

        def work(c: Connection) -> ChatExport:
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
                    " finished_at FROM inbox WHERE chat_key = %s ORDER BY sort_ts, seq",
                    (chat_key,),
                ).fetchall()
            ]
            state = c.execute(
                "SELECT paused_until, pause_reason, opted_out, day, day_count FROM chat_state WHERE chat_key = %s",
                (chat_key,),
            ).fetchone()
            return ChatExport(
                chat_key=chat_key,
                messages=messages,
                history=[
                    {"role": role, "content": content, "created_at": created_at}
                    for role, content, created_at in c.execute(
                        "SELECT role, content, created_at FROM history WHERE chat_key = %s ORDER BY id", (chat_key,)
                    ).fetchall()
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
                marks=dict(c.execute("SELECT name, value FROM chat_marks WHERE chat_key = %s", (chat_key,)).fetchall()),
                media=[
                    {"key": key, "mimetype": mimetype, "size": size, "created_at": created_at}
                    for key, mimetype, size, created_at in c.execute(
                        "SELECT key, mimetype, size, created_at FROM media"
                        " WHERE key IN (SELECT key FROM inbox WHERE chat_key = %s) ORDER BY created_at",
                        (chat_key,),
                    ).fetchall()
                ],
                downloads=[
                    {"key": key, "url": url, "mimetype": mimetype, "state": state, "reason": reason}
                    for key, url, mimetype, state, reason in c.execute(
                        "SELECT key, url, mimetype, state, reason FROM media_jobs"
                        " WHERE key IN (SELECT key FROM inbox WHERE chat_key = %s) ORDER BY created_at",
                        (chat_key,),
                    ).fetchall()
                ],
                sent=[
                    {"sent_message_id": bare_id, "sent_at": sent_at}
                    for bare_id, sent_at in c.execute(
                        "SELECT bare_id, sent_at FROM sent WHERE chat_key = %s ORDER BY sent_at", (chat_key,)
                    ).fetchall()
                ],
            )

        return self._run(work)

    def forget_chat(self, chat_key: str) -> ForgetReport:
        """Delete the chat from every table in one transaction; finished messages keep only a key with nothing
        personal."""

        def work(c: Connection) -> ForgetReport:
            def deleting(sql: str) -> int:
                # A write runs in a pipeline, which has no rowcount until it syncs: count what RETURNING gives.
                return self._count(c, f"WITH gone AS ({sql} RETURNING 1) SELECT COUNT(*) FROM gone", (chat_key,))

            # No claim meanwhile: a claim locks the chat's inbox rows and then its chat_state row (its admission),
            # and this locks them the other way round.
            c.execute(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK}, {SCHEMA_KEY})")
            # The chat's row first, as every decision about the chat locks it: none runs halfway through this.
            deleted = {"chat_state": deleting("DELETE FROM chat_state WHERE chat_key = %s")}
            deleted |= {
                "media": deleting("DELETE FROM media WHERE key IN (SELECT key FROM inbox WHERE chat_key = %s)"),
                "media_jobs": deleting(
                    "DELETE FROM media_jobs WHERE key IN (SELECT key FROM inbox WHERE chat_key = %s)"
                ),
                "history": deleting("DELETE FROM history WHERE chat_key = %s"),
                "chat_marks": deleting("DELETE FROM chat_marks WHERE chat_key = %s"),
                "sent": deleting("DELETE FROM sent WHERE chat_key = %s"),
            }
            dropped = deleting(f"DELETE FROM inbox WHERE chat_key = %s AND status IN {OPEN_SQL}")
            kept = c.execute(
                "SELECT key, message, sent_message_id FROM inbox WHERE chat_key = %s", (chat_key,)
            ).fetchall()
            for key, message, sent in kept:
                c.execute(
                    "UPDATE inbox SET chat_key = %s, message = %s, text_hash = NULL, reply_text = NULL, merged = NULL,"
                    " last_error = NULL, sent_message_id = %s WHERE key = %s",
                    (FORGOTTEN_CHAT, scrubbed_message(message), bare_message_id(sent), key),
                )
            deleted["inbox"] = dropped
            return ForgetReport(deleted=deleted, kept_keys=len(kept), dropped_open=dropped)

        return self._write(work)

    def snapshot(self) -> StoreSnapshot:
        """Counters, unfinished messages and chat states, read from one snapshot of the database."""
        now = self.clock()

        def work(c: Connection) -> StoreSnapshot:
            counters = c.execute("SELECT name, SUM(value) FROM counters GROUP BY name").fetchall()
            by_status = c.execute(f"SELECT status, COUNT(*) FROM inbox WHERE status IN {OPEN_SQL} GROUP BY status")
            retrying = c.execute(
                "SELECT COUNT(*) FROM inbox WHERE status = 'queued' AND last_error IS NOT NULL"
            ).fetchone()
            paused = c.execute(
                "SELECT pause_reason, COUNT(*) FROM chat_state WHERE paused_until > %s GROUP BY pause_reason", (now,)
            ).fetchall()
            opted_out = c.execute("SELECT COUNT(*) FROM chat_state WHERE opted_out").fetchone()
            media = c.execute("SELECT COALESCE(SUM(size), 0) FROM media").fetchone()
            chats = c.execute("SELECT COUNT(*) FROM chat_state").fetchone()
            return StoreSnapshot(
                counters={name: int(value) for name, value in counters},
                by_status=dict(by_status.fetchall()),
                retrying=retrying[0] if retrying else 0,
                paused=dict(paused),
                opted_out=opted_out[0] if opted_out else 0,
                media_bytes=int(media[0]) if media else 0,
                chats=chats[0] if chats else 0,
            )

        return self._run(work, begin="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
