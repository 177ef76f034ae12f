"""The durable inbox, chat state, history and counters in PostgreSQL, shared by every worker on every host."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from whatsapp_webhook.concurrency import Batcher, copy_of_error
from whatsapp_webhook.events import IncomingMessage, bare_message_id, text_fingerprint
from whatsapp_webhook.media import worth_downloading
from whatsapp_webhook.pg_base import Connection, database_trouble
from whatsapp_webhook.pg_chat_store import PostgresChatStore
from whatsapp_webhook.pg_media import PostgresMediaQueue
from whatsapp_webhook.pg_schema import (
    ACCEPT_SQL,
    BEGIN_SEND_FAST_SQL,
    BEGIN_SEND_SQL,
    CLAIM_DUE_SQL,
    CLAIM_LOCK,
    COUNTER_SHARDS,
    FINISH_SQL,
    OPEN_SQL,
    SCHEMA_KEY,
    SENDING_SQL,
)
from whatsapp_webhook.policy import failure_verdict, send_verdict
from whatsapp_webhook.store_api import (
    CHAT_MARKS_KEPT_SECONDS,
    SENDS_SPENT_ERROR,
    Acceptance,
    AdmissionRequest,
    ClaimedMessage,
    FailureVerdict,
    InboxEntry,
    InboxStatus,
    MediaBlob,
    Outcome,
    SendVerdict,
    Turn,
)
from whatsapp_webhook.store_schema import LLM_COST_COUNTER

ACCEPT_BATCH = 64  # deliveries recorded in one statement at most (under load; alone, one goes out at once)


class PostgresStore(PostgresChatStore, PostgresMediaQueue):
    """The Store interface on PostgreSQL (STATE_DB=postgresql://...); store.StateStore is the SQLite one.

    A message is committed here before the webhook answers 2xx. Workers take due messages under a
    renewable lease. Claims take one transaction-scoped advisory lock, so one claim at a time decides,
    over committed data, which message of a chat goes next (per-chat order across hosts), and pass over
    rows another transaction holds (FOR UPDATE SKIP LOCKED). Every other step locks the rows it decides
    about (the message, the chat) before reading them, so each is atomic across workers and hosts.
    """

    # Claims wait for no one here but each other: under a burst a dispatcher takes full batches one after the
    # other, not once per turn of its (late) loop.
    claims_in_a_row = 8

    # --- the webhook side ------------------------------------------------------------------------

    @cached_property
    def _new_messages(self) -> Batcher[IncomingMessage, bool]:
        return Batcher(self._record_new, max_batch=ACCEPT_BATCH)

    def accept(self, message: IncomingMessage) -> Acceptance:
        """Record a delivery durably, once per message; a redelivery after a failed send makes it due now.

        A new message goes in with the other deliveries this worker's threads are recording at that moment
        (one statement, ACCEPT_SQL); only a key already in the inbox costs a transaction of its own.
        """
        if self._new_messages.submit(message):
            return Acceptance(stored=True, status=InboxStatus.QUEUED, attempts=0)
        now = self.clock()
        key = message.dedupe_key

        def known(c: Connection) -> Acceptance:
            row = c.execute(
                "SELECT status, attempts, last_error FROM inbox WHERE key = %s FOR UPDATE", (key,)
            ).fetchone()
            if row is None:  # pruned between the two statements: a delivery of a long-finished message
                return Acceptance(stored=False, status=InboxStatus.DONE, attempts=0)
            status, attempts, last_error = row
            if status == InboxStatus.QUEUED and last_error is not None:
                # WAHA redelivers what we answered with 5xx: try again now rather than at the backoff.
                # That attempt is WAHA's (bounded by its own retry policy), so it does not use up ours.
                c.execute(
                    "UPDATE inbox SET next_attempt_at = %s, attempts = attempts - 1, updated_at = %s WHERE key = %s",
                    (now, now, key),
                )
                return Acceptance(stored=True, status=InboxStatus(status), attempts=attempts - 1)
            return Acceptance(stored=False, status=InboxStatus(status), attempts=attempts)

        return self._write(known)

    def _record_new(self, messages: list[IncomingMessage]) -> list[bool | BaseException]:
        """ACCEPT_SQL for a batch: which of `messages` it recorded (a key twice in it: the first one).

        A batch the database refuses for what one delivery holds (not an outage) is tried again one delivery
        at a time, so that delivery alone fails (the Batcher raises its error in its own thread).
        """
        try:
            return list(self._insert_new(messages))
        except Exception as exc:
            if len(messages) == 1 or database_trouble(exc):
                raise
        results: list[bool | BaseException] = []
        trouble: BaseException | None = None
        for message in messages:
            if trouble is not None:  # the database itself failed meanwhile: the rest would only wait for it
                results.append(copy_of_error(trouble))
                continue
            try:
                results += self._insert_new([message])
            except Exception as exc:
                results.append(exc)
                trouble = exc if database_trouble(exc) else None
        return results

    def _insert_new(self, messages: list[IncomingMessage]) -> list[bool]:
        now = self.clock()
        wanted = [worth_downloading(m.media_url, m.media_mimetype) for m in messages]
        params = {
            "keys": [m.dedupe_key for m in messages],
            "chat_keys": [m.chat_key for m in messages],
            "sort_ts": [float(m.timestamp or now) for m in messages],
            "messages": [m.to_json() for m in messages],
            "text_hashes": [text_fingerprint(m.text) for m in messages],
            "urls": [m.media_url if want else None for m, want in zip(messages, wanted, strict=True)],
            "mimetypes": [(m.media_mimetype or "") if want else "" for m, want in zip(messages, wanted, strict=True)],
            "now": now,
        }
        inserted = set(
            self._run(
                lambda c: [
                    key
                    for (key,) in c.execute(
                        ACCEPT_SQL, {**params, "shard": c.info.backend_pid % COUNTER_SHARDS}
                    ).fetchall()
                ]
            )
        )
        recorded = []
        for message in messages:
            recorded.append(message.dedupe_key in inserted)
            inserted.discard(message.dedupe_key)
        return recorded

    def entry(self, key: str) -> InboxEntry | None:
        """A message's state; a message merged into another reports that one's sent id and error."""
        row = self._run(
            lambda c: c.execute(
                "SELECT m.status, m.attempts, m.outcome, COALESCE(m.sent_message_id, lead.sent_message_id),"
                " COALESCE(m.last_error, lead.last_error), m.merged_into"
                " FROM inbox m LEFT JOIN inbox lead ON lead.key = m.merged_into WHERE m.key = %s",
                (key,),
            ).fetchone()
        )
        if not row:
            return None
        status, attempts, outcome, sent_message_id, last_error, merged_into = row
        return InboxEntry(
            status=InboxStatus(status),
            attempts=attempts,
            outcome=Outcome(outcome) if outcome else None,
            sent_message_id=sent_message_id,
            last_error=last_error,
            merged_into=merged_into,
        )

    # --- the worker side -------------------------------------------------------------------------

    def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        debounce_seconds: float = 0.0,
        mergeable: Callable[[IncomingMessage], bool] = lambda message: False,
        admit: Callable[[ClaimedMessage], AdmissionRequest | None] = lambda claimed: None,
    ) -> list[ClaimedMessage]:
        """Take up to `limit` due messages, at most one per chat (the earliest), in one transaction, with the
        admission `admit` asks for (called in the transaction, after the bursts are merged) decided in it too."""
        now = self.clock()
        params = {
            "now": now,
            "quiet_since": now - debounce_seconds,
            "burst_limit": now - 4 * debounce_seconds,
            "limit": limit,
            "owner": owner,
            "expires": now + lease_seconds,
        }

        def work(c: Connection) -> list[ClaimedMessage]:
            c.execute(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK}, {SCHEMA_KEY})")
            rows = sorted(c.execute(CLAIM_DUE_SQL, params).fetchall(), key=lambda row: (row[10], row[11]))
            claimed = [self._claimed(row, owner) for row in rows]
            if debounce_seconds:
                claimed = self._merge_bursts(c, claimed, now=now, mergeable=mergeable)
            return self._admitted(c, claimed, [admit(one) for one in claimed], now=now)

        return self._write(work)

    @staticmethod
    def _claimed(row: tuple[Any, ...], owner: str) -> ClaimedMessage:
        (_, message, status, attempts, reply_text, outcome, send_started_at, received_at, parts_sent, merged) = row[:10]
        return ClaimedMessage(
            message=IncomingMessage.from_json(message),
            lease_owner=owner,
            previous_status=InboxStatus.SENDING if status == InboxStatus.SENDING else InboxStatus.QUEUED,
            attempts=attempts,
            reply_text=reply_text,
            outcome=Outcome(outcome) if outcome else None,
            send_started_at=send_started_at,
            received_at=received_at,
            parts_sent=parts_sent,
            merged=tuple(IncomingMessage.from_json(text) for text in json.loads(merged or "[]")),
        )

    @staticmethod
    def _merge_bursts(
        c: Connection, claimed: list[ClaimedMessage], *, now: float, mergeable: Callable[[IncomingMessage], bool]
    ) -> list[ClaimedMessage]:
        """Each lead's chat's next queued messages join its reply, up to the first one that must stand alone.

        Once a reply exists, its wording is fixed: later messages wait for their own turn.
        """
        leads = {item.message.chat_key: item for item in claimed if item.reply_text is None and mergeable(item.message)}
        if not leads:
            return claimed
        rows = c.execute(
            "SELECT chat_key, key, message, attempts, reply_text, next_attempt_at FROM inbox"
            " WHERE chat_key = ANY(%s) AND status = 'queued' ORDER BY chat_key, sort_ts, seq",
            (list(leads),),
        ).fetchall()
        joined: dict[str, list[IncomingMessage]] = {chat: [] for chat in leads}
        closed: set[str] = set()
        followers: list[tuple[str, str]] = []  # (follower key, lead key)
        for chat_key, key, text, attempts, reply_text, next_attempt_at in rows:
            if chat_key in closed:
                continue
            follower = IncomingMessage.from_json(text)
            # A message that was already tried has its own reply (maybe half sent): it keeps its turn.
            if attempts or reply_text is not None or next_attempt_at > now or not mergeable(follower):
                closed.add(chat_key)
                continue
            joined[chat_key].append(follower)
            followers.append((key, leads[chat_key].message.dedupe_key))
        if not followers:
            return claimed
        c.execute(
            "UPDATE inbox SET status = 'merged', merged_into = f.lead, updated_at = %s"
            " FROM unnest(%s::text[], %s::text[]) AS f(key, lead) WHERE inbox.key = f.key AND inbox.status = 'queued'",
            (now, [key for key, _ in followers], [lead for _, lead in followers]),
        )
        result = []
        for item in claimed:
            extra = joined.get(item.message.chat_key) if leads.get(item.message.chat_key) is item else None
            if extra:
                item = replace(item, merged=(*item.merged, *extra))
                c.execute(
                    "UPDATE inbox SET merged = %s WHERE key = %s",
                    (json.dumps([m.to_json() for m in item.merged]), item.message.dedupe_key),
                )
            result.append(item)
        return result

    def renew_leases(self, keys: Iterable[str], owner: str, *, lease_seconds: float) -> int:
        """Extend the leases `owner` still holds among `keys`, in one step; returns how many it holds."""
        now, keys = self.clock(), list(keys)
        if not keys:
            return 0
        return self._write(
            lambda c: self._count(
                c,
                "WITH renewed AS (UPDATE inbox SET lease_expires_at = %s WHERE key = ANY(%s) AND lease_owner = %s"
                " AND status IN ('processing', 'sending') RETURNING 1) SELECT COUNT(*) FROM renewed",
                (now + lease_seconds, keys, owner),
            )
        )

    def begin_send(
        self,
        key: str,
        owner: str,
        *,
        parts: list[str],
        reply: tuple[str, Outcome] | None = None,
        llm_cost_usd: float = 0.0,
        max_sends: int | None = None,
    ) -> SendVerdict:
        """Last check before sendText (policy.send_verdict), with the message's row locked until it is acted on.

        A new `reply` (text, outcome) is stored in the same step, so a retry resends the same words.
        `llm_cost_usd`, what writing it cost, is added to the shared total whatever the verdict: it was spent.
        Each SEND counts one send of the message; once `max_sends` are used it is given up (SPENT).
        A plain SEND is one statement (BEGIN_SEND_FAST_SQL); if the connection is lost as it commits, the retry
        counts that send and the cost twice (the reply still goes out once).
        """
        now = self.clock()
        cost = round(llm_cost_usd * 1e9)  # in billionths of a dollar: the counters are integers
        sending = {
            "key": key,
            "now": now,
            "hashes": [text_fingerprint(part) for part in parts],
            "sending": 1 if parts else 0,
            "new": reply is not None,
            "text": reply[0] if reply else None,
            "outcome": str(reply[1]) if reply else None,
            "cost_name": LLM_COST_COUNTER,
        }

        def at_once(c: Connection) -> bool:
            params = {**sending, "owner": owner, "max_sends": max_sends if parts else None, "cost": cost}
            row = c.execute(BEGIN_SEND_FAST_SQL, params | {"shard": c.info.backend_pid % COUNTER_SHARDS}).fetchone()
            return bool(row and row[0])

        # Almost every reply may go out at once: one statement decides and records that (and counts the cost).
        if self._run(at_once):
            return SendVerdict.SEND

        def work(c: Connection) -> SendVerdict:
            row = c.execute(BEGIN_SEND_SQL, {"key": key, "now": now}).fetchone()
            holds_lease = (
                row is not None and row[1] == owner and row[0] in (InboxStatus.PROCESSING, InboxStatus.SENDING)
            )
            verdict, chat_key = SendVerdict.LOST, ""
            if row is not None and holds_lease:
                status, _, chat_key, parts_sent, sends, earlier_open, paused = row
                verdict = send_verdict(
                    holds_lease=True,
                    already_sending=status == InboxStatus.SENDING or parts_sent > 0,
                    earlier_open=earlier_open,
                    paused=paused,
                    sends=sends,
                    max_sends=max_sends if parts else None,  # nothing left to send (it all went out): no send
                )
            if verdict is SendVerdict.SPENT:
                self._give_up(c, key, SENDS_SPENT_ERROR, now)
            elif verdict is SendVerdict.YIELD:
                # Answering now would overtake a message the customer sent first.
                c.execute(
                    "UPDATE inbox SET status = 'queued', attempts = attempts - 1, lease_owner = NULL,"
                    " lease_expires_at = 0, next_attempt_at = %s, reply_text = NULL, outcome = NULL,"
                    " parts_sent = 0, merged = NULL, updated_at = %s WHERE key = %s",
                    (now, now, key),
                )
                c.execute("UPDATE inbox SET status = 'queued', merged_into = NULL WHERE merged_into = %s", (key,))
            elif verdict is SendVerdict.SEND:  # it changed since the statement above looked: a SEND after all
                shard = c.info.backend_pid % COUNTER_SHARDS
                c.execute(SENDING_SQL, sending | {"chat_key": chat_key, "cost": 0, "shard": shard})
            return verdict

        # The rest (yield, pause, spent, lost) is decided with the row locked, by policy.send_verdict.
        return self._write(work)

    def mark_part_sent(self, key: str, owner: str, *, parts_sent: int, sent_message_id: str | None) -> bool:
        """Progress of a reply sent in parts: a retry resumes after the last part WAHA accepted.

        False when the lease went to another worker meanwhile: this worker must stop sending.
        """
        now = self.clock()

        def work(c: Connection) -> bool:
            if sent_message_id:
                c.execute(
                    "INSERT INTO sent (chat_key, text_hash, bare_id, sent_at)"
                    " SELECT chat_key, '', %s, %s FROM inbox WHERE key = %s",
                    (bare_message_id(sent_message_id), now, key),
                )
            return bool(
                c.execute(
                    "UPDATE inbox SET parts_sent = %s, sent_message_id = COALESCE(%s, sent_message_id),"
                    " send_started_at = %s, updated_at = %s WHERE key = %s AND lease_owner = %s RETURNING 1",
                    (parts_sent, sent_message_id, now, now, key, owner),
                ).fetchone()
            )

        return self._write(work)

    def finish(
        self,
        key: str,
        owner: str,
        *,
        outcome: Outcome,
        sent_message_id: str | None,
        history: tuple[Turn, Turn] | None = None,
        last_part_id: str | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> bool:
        """The reply is out (or deliberately not sent: outcome 'skipped'); merged messages finish with it.

        Fencing: without the lease (another worker or host took the message over) only a reply whose
        sending began may be finished here (its text kept, whatever the status since: the new owner's own
        failed send puts it back in the queue): once WAHA took the text, the message is answered, and saying
        so stops the new owner from sending a second copy. A decision not to send (outcome 'skipped')
        belongs to the current owner alone. True when this call finished the message (False: nothing
        changed, and nothing was counted).
        """
        now = self.clock()
        # A fallback reply means the LLM failed: the customer got an apology, not an answer. A notice
        # ("too many messages") is not an answer either. Merged messages count with it.
        counter = {
            Outcome.FALLBACK: "messages_failed",
            Outcome.SKIPPED: "messages_skipped",
            Outcome.NOTICE: "messages_skipped",
        }.get(outcome, "messages_processed")
        names = [name for name, amount in (counts or {}).items() if amount]
        params = {
            "key": key,
            "owner": owner,
            "now": now,
            "outcome": str(outcome),
            "followers_outcome": str(Outcome.MERGED if outcome == Outcome.SUCCESS else outcome),
            "sent_id": sent_message_id,
            "last_part": bare_message_id(last_part_id) if last_part_id else None,
            "roles": [turn.role for turn in history or ()],
            "contents": [turn.content for turn in history or ()],
            "counter": counter,
            "names": names,
            "amounts": [(counts or {})[name] for name in names],
        }

        def work(c: Connection) -> bool:
            # One statement, in autocommit (FINISH_SQL): nothing else can be seen half done.
            shard = c.info.backend_pid % COUNTER_SHARDS
            return c.execute(FINISH_SQL, {**params, "shard": shard}).fetchone() is not None

        return self._run(work)

    def record_failure(self, key: str, owner: str, error: str, *, max_attempts: int, retry_in: float) -> FailureVerdict:
        """After a failed attempt: due again later, or given up once attempts are used (policy.failure_verdict)."""
        now = self.clock()

        def work(c: Connection) -> FailureVerdict:
            row = c.execute(
                "SELECT attempts FROM inbox WHERE key = %s AND lease_owner = %s FOR UPDATE", (key, owner)
            ).fetchone()
            verdict = failure_verdict(
                holds_lease=row is not None, attempts=row[0] if row else 0, max_attempts=max_attempts
            )
            if verdict is FailureVerdict.FAILED:
                self._give_up(c, key, error, now)
            elif verdict is FailureVerdict.RETRY:
                c.execute(
                    "UPDATE inbox SET status = 'queued', last_error = %s, lease_owner = NULL, lease_expires_at = 0,"
                    " next_attempt_at = %s, updated_at = %s WHERE key = %s",
                    (error[:500], now + retry_in, now, key),
                )
            return verdict

        return self._write(work)

    def _give_up(self, c: Connection, key: str, error: str, now: float) -> None:
        """The message (and the messages merged into it) will not be answered: failed, counted undelivered."""
        c.execute(
            "UPDATE inbox SET status = 'failed', last_error = %s, lease_owner = NULL, finished_at = %s,"
            " updated_at = %s WHERE key = %s",
            (error[:500], now, now, key),
        )
        self._bump_with_followers(
            c,
            "UPDATE inbox SET status = 'failed', finished_at = %s, updated_at = %s"
            " WHERE merged_into = %s AND status = 'merged'",
            (now, now, key),
            counters=["messages_failed", "messages_undelivered"],
        )

    def release(self, key: str, owner: str) -> None:
        """Hand a message back untried (shutdown, crash in our code): due at once, attempt not counted.

        A message caught mid-send keeps status 'sending', so whoever takes it next checks
        WAHA before sending again. Merged messages stay with it.
        """
        now = self.clock()
        self._write(
            lambda c: c.execute(
                "UPDATE inbox SET status = CASE status WHEN 'sending' THEN 'sending' ELSE 'queued' END,"
                " attempts = GREATEST(attempts - 1, 0), lease_owner = NULL, lease_expires_at = 0,"
                " next_attempt_at = %s, updated_at = %s WHERE key = %s AND lease_owner = %s"
                " AND status IN ('processing', 'sending')",
                (now, now, key, owner),
            )
        )

    def expire_leases(self, *, only_run_out: bool = False) -> int:
        """Restart recovery: make unfinished messages due now. `only_run_out` (what a server on PostgreSQL
        uses, app.recover_after_restart) takes only leases that ran out: the others may be a live host's."""
        now = self.clock()
        return self._write(
            lambda c: self._count(
                c,
                "WITH expired AS (UPDATE inbox SET lease_expires_at = 0, lease_owner = NULL"
                " WHERE status IN ('processing', 'sending') AND (NOT %s OR lease_expires_at < %s) RETURNING 1)"
                " SELECT COUNT(*) FROM expired",
                (only_run_out, now),
            )
        )

    def prune(self, *, older_than: float, history_older_than: float) -> int:
        """Forget finished messages past the retention and conversation turns past their TTL."""

        def work(c: Connection) -> int:
            removed = self._count(
                c,
                "WITH gone AS (DELETE FROM inbox WHERE status IN ('done', 'failed') AND finished_at < %s RETURNING 1)"
                " SELECT COUNT(*) FROM gone",
                (older_than,),
            )
            c.execute("DELETE FROM history WHERE created_at < %s", (history_older_than,))
            c.execute("DELETE FROM sent WHERE sent_at < %s", (older_than,))
            c.execute("DELETE FROM chat_marks WHERE updated_at < %s", (self.clock() - CHAT_MARKS_KEPT_SECONDS,))
            # A chat nobody has heard from since the retention began (as in the SQLite store).
            older_day = datetime.fromtimestamp(older_than, UTC).strftime("%Y-%m-%d")
            c.execute(
                "DELETE FROM chat_state s WHERE NOT s.opted_out AND s.paused_until < %s AND s.minute_start < %s"
                " AND s.notice_at < %s AND s.day < %s AND NOT EXISTS (SELECT 1 FROM inbox m WHERE"
                f" m.chat_key = s.chat_key AND (m.status IN {OPEN_SQL} OR m.finished_at >= %s))",
                (older_than, older_than, older_than, older_day, older_than),
            )
            self._prune_media(c)
            # Bytes whose message is finished or gone (the reply no longer needs them).
            c.execute(
                "DELETE FROM media WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.key = media.key"
                f" AND inbox.status IN {OPEN_SQL})"
            )
            return removed

        return self._write(work)

    # --- media bytes ---------------------------------------------------------------------------------

    def put_media(self, key: str, *, mimetype: str, data: bytes) -> None:
        """Keep a message's media until the message is finished or pruned (written once; a redelivery is a no-op)."""
        now = self.clock()
        self._write(
            lambda c: c.execute(
                "INSERT INTO media (key, mimetype, data, size, created_at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING",
                (key, mimetype, data, len(data), now),
            )
        )

    def get_media(self, key: str) -> MediaBlob | None:
        row = self._run(
            lambda c: c.execute("SELECT mimetype, data, created_at FROM media WHERE key = %s", (key,)).fetchone()
        )
        return MediaBlob(key=key, mimetype=row[0], data=bytes(row[1]), created_at=row[2]) if row else None
