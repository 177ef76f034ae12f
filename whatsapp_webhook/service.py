"""The webhook service: the framework-free core that turns one request (raw bytes + headers) into an answer."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import (
    Callable,
    Mapping,
)
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, overload

from whatsapp_webhook import SERVICE_NAME, __version__
from whatsapp_webhook.business import session_breakdown
from whatsapp_webhook.events import (
    BadRequestError,
    Ignored,
    IgnoreReason,
    OwnMessage,
    SessionStatus,
    classify_event,
    parse_event,
)
from whatsapp_webhook.health import (
    CHECK_SEVERITY,
    HEALTH_CHECKS,
    CheckStatus,
    HealthCheck,
    HealthReporter,
    ServerHealth,
    combine_checks,
    overall_health,
)
from whatsapp_webhook.logs import MessageLog, log
from whatsapp_webhook.media import kind_of
from whatsapp_webhook.metrics import (
    MEDIA_RECEIVED,
    MESSAGES_IGNORED,
    MESSAGES_RECEIVED,
    REQUESTS_REJECTED,
    ScrapeReading,
)
from whatsapp_webhook.pipeline import message_log
from whatsapp_webhook.policy import PAUSED_FOREVER, EveryMinute
from whatsapp_webhook.sessions_config import SessionsFile, reply_in_groups_for
from whatsapp_webhook.signature import verify_token, verify_waha_hmac
from whatsapp_webhook.store_api import OPEN_STATUSES, StoreUnavailable
from whatsapp_webhook.store_schema import IGNORED_COUNTER_PREFIX, LLM_COST_COUNTER

if TYPE_CHECKING:
    from whatsapp_webhook.events import IncomingMessage, WebhookEvent
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import InboxEntry, Store
    from whatsapp_webhook.worker import WorkerRuntime


TALLY_FLUSH_SECONDS = 1.0  # how often each worker writes its counts of rejected and ignored requests
RUNTIME_UNAVAILABLE = "reply runtime unavailable; the message waits in the inbox"


class RequestHeaders(Protocol):
    """The header lookups the service makes: Werkzeug's case-insensitive Headers, or a plain mapping in tests."""

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, default: str, /) -> str: ...


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@functools.cache
def ignored_metric(reason: str) -> Any:
    """The counter's child for one reason, looked up once (labels() validates and locks on every call)."""
    return MESSAGES_IGNORED.labels(reason)


class RequestTally:
    """The counts of rejected and ignored requests, kept in memory and written to the store in batches.

    One SQLite write per request would let a flood of unauthenticated or ignored requests queue every
    worker at the write gate; here a worker writes its counts about once a second (`flush`, run by its
    event loop), when it answers /stats (so it shows its own counts at once) and when it exits. Counts a
    failing store could not take wait for the next flush. The rejection log line is thinned out the same
    way: the first of each status is logged, the rest are summed up in one line a minute.
    """

    def __init__(self, store: Store, *, summary_seconds: float = 60.0) -> None:
        self.store = store
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()  # request threads add while a flush takes the batch
        self._flushing = threading.Lock()  # one batch at a time, so a flush returns only once earlier ones landed
        self._logged = EveryMinute(interval=summary_seconds)

    def add(self, name: str) -> None:
        with self._lock:
            self._pending[name] += 1

    def log_rejection(self, status: int, message: str, *args: object) -> None:
        """Log this rejection if it is the first of its status in a while; otherwise count it for the summary."""
        with self._lock:
            quiet = self._logged.due(str(status))
        if quiet is not None:
            log.warning(message + (f" ({quiet} more since the last line)" if quiet else ""), *args)

    def flush(self, *, final: bool = False) -> None:
        """Write the pending counts in one transaction and log the summaries that are due (all, if `final`)."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, Counter()
                summaries = self._logged.overdue(everything=final)
            for status, quiet in summaries:
                log.warning(
                    "requests rejected status=%s: %d more since the last line (after the first, rejections "
                    "are summed up once a minute)",
                    status,
                    quiet,
                )
            if not pending:
                return
            try:
                self.store.count_many(pending)
            except StoreUnavailable as exc:
                with self._lock:
                    self._pending.update(pending)
                log.warning("could not count %s yet: %s", ", ".join(sorted(pending)), exc)


class WebhookService:
    """Turns one webhook request (raw bytes + headers) into a JSON answer and a status code."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        started_at: float,
        runtime_factory: Callable[[], WorkerRuntime],
        health: HealthReporter | None = None,
        poll_seconds: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock  # wall time, like the store's
        self.health = health or HealthReporter(store=store)
        self.started_at = started_at
        self._store_health = (CheckStatus.OK, started_at)  # this worker's view: the store cannot report itself
        self.poll_seconds = poll_seconds
        self._runtime_factory = runtime_factory
        self._runtime: WorkerRuntime | None = None
        self._runtime_lock = threading.Lock()
        # Waiting requests hold gunicorn threads; past this many, answer 202 at once so new
        # deliveries are still recorded promptly (the inbox makes 202 as safe as 200).
        self._waiting_slots = (
            threading.BoundedSemaphore(settings.webhook_max_waiting) if settings.webhook_max_waiting else None
        )
        self._shutting_down = threading.Event()
        self.tally = RequestTally(store)
        self.sessions = SessionsFile(settings.sessions_file)  # REPLY_IN_GROUPS per session

    def begin_shutdown(self) -> None:
        """SIGTERM: stop holding webhook requests (their messages are recorded) so gunicorn can move on."""
        self._shutting_down.set()

    def runtime(self) -> WorkerRuntime:
        """The worker's runtime, built on first use (or by gunicorn's post_worker_init), always after the fork."""
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._runtime_lock:
            if self._runtime is None or self._runtime.pid != os.getpid():
                self._runtime = self._runtime_factory()
                self._runtime.background.every(TALLY_FLUSH_SECONDS, self.tally.flush)
            return self._runtime

    def close(self, *, drain_seconds: float = 10.0) -> None:
        with self._runtime_lock:
            if self._runtime is not None and self._runtime.pid == os.getpid():
                self._runtime.close(drain_seconds=drain_seconds)
            self._runtime = None
        self.tally.flush(final=True)
        self.store.close()

    def handle_webhook(self, body: bytes, headers: RequestHeaders) -> tuple[dict[str, Any], int]:
        request_id = headers.get("X-Webhook-Request-Id", "-")
        rejection = self._check_sender(body, headers)
        if rejection is not None:
            self.reject(
                401,
                "request=%(request)s rejected status=%(status)d reason=%(reason)s",
                {"request": request_id, "status": 401, "reason": rejection},
                counter="requests_unauthorized",
            )
            return {"error": rejection}, 401
        try:
            if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                raise BadRequestError("Content-Type must be application/json", status=415)
            event = parse_event(body)
            if self._is_replay(event):
                return self._ignore(
                    event.event_id,
                    self._chat_of(event),
                    Ignored(IgnoreReason.STALE_EVENT, "a signed event older than WEBHOOK_STALE_SECONDS is a replay"),
                )
            decision = classify_event(
                event, reply_in_groups=reply_in_groups_for(self.settings, self.sessions, event.session)
            )
        except BadRequestError as exc:
            self.reject(
                exc.status,
                "request=%(request)s rejected status=%(status)d error=%(error)s",
                {"request": request_id, "status": exc.status, "error": exc.message},
            )
            return {"error": exc.message}, exc.status

        if isinstance(decision, SessionStatus):
            check, reason = decision.check
            self.health.report(f"waha:{decision.session}", check, reason)
            return self._ignore(
                decision.event_id, None, Ignored(IgnoreReason.SESSION_STATUS, f"recorded for /health: {reason}")
            )
        if isinstance(decision, Ignored):
            return self._ignore(event.event_id, self._chat_of(event), decision)
        try:
            if isinstance(decision, OwnMessage):
                return self._ignore(decision.event_id, decision.chat_id, self._notice_own_message(decision))
            if decision.is_group and not self._addressed_in_group(decision):
                return self._ignore(
                    decision.event_id,
                    decision.chat_id,
                    Ignored(
                        IgnoreReason.GROUP_NOT_ADDRESSED, "in groups the bot answers only when mentioned or replied to"
                    ),
                )
        except StoreUnavailable as exc:
            MessageLog(event=decision.event_id).error("store unavailable: %(error)s", {"error": str(exc)})
            return {"error": "state store unavailable; please redeliver"}, 503
        message = decision
        try:
            accepted = self.store.accept(message)
        except StoreUnavailable as exc:
            # Never 2xx for a message we could not write down: WAHA redelivers 5xx.
            message_log(message).error(
                "store unavailable, asking WAHA to redeliver key=%(key)s: %(error)s",
                {"key": message.dedupe_key, "error": str(exc)},
            )
            return {"error": "state store unavailable; message not recorded, please redeliver"}, 503
        if not accepted.stored:
            detail = {"done": "message already answered", "failed": "message already given up on"}.get(
                accepted.status, "message is being answered"
            )
            return self._ignore(message.event_id, message.chat_id, Ignored(IgnoreReason.DUPLICATE, detail))

        if accepted.attempts == 0:
            MESSAGES_RECEIVED.inc()
            if message.has_media:
                MEDIA_RECEIVED.labels(str(kind_of(message.media_mimetype))).inc()
        message_log(message).info(
            "engine=%(engine)s decision=%(decision)s key=%(key)s text_chars=%(text_chars)d",
            {
                "engine": message.engine,
                "decision": "reply",
                "key": message.dedupe_key,
                "text_chars": len(message.text or ""),
            },
        )
        return self._await_reply(message, attempts_before=accepted.attempts)

    def _await_reply(self, message: IncomingMessage, *, attempts_before: int) -> tuple[dict[str, Any], int]:
        """Wait up to WEBHOOK_SYNC_WAIT_SECONDS for this message's attempt to end (the inbox already has it)."""
        key = message.dedupe_key
        try:
            runtime = self.runtime()
        except Exception:
            MessageLog(event=message.event_id).exception(RUNTIME_UNAVAILABLE)
            return self._accepted(message)
        if self._waiting_slots is None or not self._waiting_slots.acquire(blocking=False):
            self._woke(runtime, message)
            return self._accepted(message)
        # Watched before the dispatcher is woken, so an attempt this worker ends at once still wakes us; the
        # message was only just recorded, so the inbox is read only once something may have happened.
        ended = runtime.completions.watch(key)
        try:
            if not self._woke(runtime, message):
                return self._accepted(message)
            deadline = time.monotonic() + self.settings.webhook_sync_wait_seconds
            while (remaining := deadline - time.monotonic()) > 0 and not self._shutting_down.is_set():
                # Woken at once when this worker ends the attempt; polling covers the other workers.
                ended.wait(min(remaining, self.poll_seconds))
                ended.clear()
                entry = self.store.entry(key)
                if entry is not None and (
                    entry.status in ("done", "failed")
                    or (entry.status == "queued" and entry.attempts > attempts_before and entry.last_error)
                ):
                    return self._outcome(message, entry)
            return self._accepted(message)
        except StoreUnavailable:
            return self._accepted(message)  # the message is recorded; a worker will finish it
        finally:
            runtime.completions.unwatch(key)
            self._waiting_slots.release()

    @staticmethod
    def _woke(runtime: WorkerRuntime, message: IncomingMessage) -> bool:
        """Wake this worker's dispatcher; False (and logged) when the reply runtime cannot be reached."""
        try:
            runtime.wake_dispatcher()
        except Exception:
            MessageLog(event=message.event_id).exception(RUNTIME_UNAVAILABLE)
            return False
        return True

    def _notice_own_message(self, own: OwnMessage) -> Ignored:
        """Our echo is ignored; a person writing from this account pauses the bot there (human handoff)."""
        settings = self.settings
        if self.store.is_our_message(own.chat_key, message_id=own.message_id, text=own.text, within=600):
            return Ignored(IgnoreReason.FROM_ME, "the bot's own reply")
        said = " ".join((own.text or "").lower().split())
        own_log = MessageLog(event=own.event_id, chat=own.chat_id)
        if said == " ".join(settings.bot_resume_command.lower().split()):
            self.store.pause_chat(own.chat_key, until=0, reason="operator")
            own_log.info("decision=%(decision)s (operator command)", {"decision": "bot_resumed"})
            return Ignored(IgnoreReason.FROM_ME, "operator command: bot resumed in this chat")
        if said == " ".join(settings.bot_pause_command.lower().split()):
            self.store.pause_chat(own.chat_key, until=PAUSED_FOREVER, reason="operator")
            own_log.info(
                "decision=%(decision)s reason=%(reason)s until=resume command",
                {"decision": "bot_paused", "reason": "operator"},
            )
            return Ignored(IgnoreReason.FROM_ME, "operator command: bot paused in this chat until resumed")
        if not settings.handoff_pause_minutes:
            return Ignored(IgnoreReason.FROM_ME, "message sent by a person from this account")
        until = self.clock() + settings.handoff_pause_minutes * 60
        self.store.pause_chat(own.chat_key, until=until, reason="handoff")
        own_log.info(
            "decision=%(decision)s reason=%(reason)s minutes=%(minutes).0f",
            {"decision": "bot_paused", "reason": "handoff", "minutes": settings.handoff_pause_minutes},
        )
        return Ignored(
            "from_me", f"a person answered: bot paused in this chat for {settings.handoff_pause_minutes:g} min"
        )

    def _addressed_in_group(self, message: IncomingMessage) -> bool:
        return message.mentions_bot or bool(
            message.reply_to_id
            and self.store.is_our_message(
                message.chat_key, message_id=message.reply_to_id, text=None, within=float("inf")
            )
        )

    def _accepted(self, message: IncomingMessage) -> tuple[dict[str, Any], int]:
        message_log(message).info("decision=%(decision)s (reply continues in background)", {"decision": "accepted"})
        return {
            "status": "accepted",
            "message_key": message.dedupe_key,
            "detail": "message recorded; the reply will be sent",
            "timestamp": utc_now_iso(),
        }, 202

    @staticmethod
    def _outcome(message: IncomingMessage, entry: InboxEntry) -> tuple[dict[str, Any], int]:
        if entry.status == "done":
            return {
                "status": "processed",
                "result": {
                    "status": entry.outcome,
                    "from_number": message.chat_id,
                    "response_sent": entry.outcome != "skipped",
                    "message_id": entry.sent_message_id,
                },
                "timestamp": utc_now_iso(),
            }, 200
        if entry.status == "failed":
            # Redelivering would not help any more: say so with 200 so WAHA stops.
            return {
                "status": "failed",
                "result": {
                    "status": "failed",
                    "from_number": message.chat_id,
                    "response_sent": False,
                    "message_id": None,
                },
                "error": "the reply could not be delivered after every attempt",
                "timestamp": utc_now_iso(),
            }, 200
        # WAHA's own error text stays in our log: it can carry stack traces.
        return {"error": "the reply could not be sent yet; please redeliver"}, 503

    def _is_replay(self, event: WebhookEvent) -> bool:
        """WAHA signs the envelope's `timestamp` with the body, so an old signed body replayed is told by it.

        Only with HMAC on (without it anyone can send any timestamp); an envelope without one (older WAHA) passes.
        """
        if not self.settings.webhook_hmac_key or event.timestamp_ms is None:
            return False
        return self.clock() - event.timestamp_ms / 1000 > self.settings.webhook_stale_seconds

    def _check_sender(self, body: bytes, headers: RequestHeaders) -> str | None:
        token = self.settings.webhook_secret_token
        if token and not verify_token(headers.get("X-Webhook-Token"), token):
            return "missing or invalid X-Webhook-Token header"
        key = self.settings.webhook_hmac_key
        if key and not verify_waha_hmac(
            body, headers.get("X-Webhook-Hmac"), key, algorithm=headers.get("X-Webhook-Hmac-Algorithm")
        ):
            return "missing or invalid X-Webhook-Hmac signature"
        return None

    def _ignore(self, event_id: str | None, chat_id: str | None, ignored: Ignored) -> tuple[dict[str, Any], int]:
        # Most of WAHA's traffic ends here (an ack per message), so it costs a counter, not a log record.
        if log.isEnabledFor(logging.INFO):
            MessageLog(event=event_id, chat=chat_id).info(
                "decision=%(decision)s reason=%(reason)s", {"decision": "ignored", "reason": ignored.reason}
            )
        ignored_metric(ignored.reason).inc()
        self.tally.add(IGNORED_COUNTER_PREFIX + ignored.reason)
        return {"status": "ignored", "reason": ignored.reason, "detail": ignored.detail}, 200

    @staticmethod
    def _chat_of(event: WebhookEvent) -> str | None:
        chat = (event.payload or {}).get("from")
        return chat if isinstance(chat, str) else None

    def reject(self, status: int, message: str, *args: object, counter: str = "requests_rejected") -> None:
        """Count a refused request (metric, /stats) and log it, the first of its status at once, the rest summed up."""
        REQUESTS_REJECTED.labels(str(status)).inc()
        self.tally.add(counter)
        self.tally.log_rejection(status, message, *args)

    def health_document(self) -> tuple[dict[str, Any], int]:
        """/health: one status for the whole server, the same from every worker, and the checks behind it."""
        checks = self.health_checks()
        status = overall_health(checks)
        shown = {name: check.to_json() for name, check in checks.items()}
        if status is ServerHealth.UNHEALTHY:
            return {
                "status": str(status),
                "service": SERVICE_NAME,
                "version": __version__,
                "checks": shown,
                "error": "state store unavailable",
                "timestamp": utc_now_iso(),
            }, 503
        return self.status_document(str(status), checks=shown), 200

    def health_checks(self) -> dict[str, HealthCheck]:
        """store (a real write, now), llm and waha (what the workers reported, from the shared store)."""
        try:
            self.store.ping()
            store = self._store_check(CheckStatus.OK, "the state store takes writes")
            reports = self.store.health_reports()
        except StoreUnavailable as exc:
            log.error("health check failed: %s", exc)
            store = self._store_check(CheckStatus.FAILING, exc.health_reason)
            reports = self.health.last_known()
        checks = {"store": store}
        for part in HEALTH_CHECKS[1:]:
            checks[part] = combine_checks(
                report for name, report in reports.items() if name == part or name.startswith(part + ":")
            ) or HealthCheck(
                status=CheckStatus.OK,
                reason=f"no {part.upper()} problem reported since the server started",
                since=self.started_at,
            )
        return checks

    def scrape_reading(self) -> ScrapeReading:
        """What /metrics reads from the shared store once per scrape: the /health checks and the inbox backlog.

        A store that cannot be read leaves the backlog out of this scrape (and the store check says failing),
        so /metrics keeps answering with everything else.
        """
        checks = {name: CHECK_SEVERITY[check.status] for name, check in self.health_checks().items()}
        try:
            snapshot = self.store.snapshot()
        except StoreUnavailable as exc:
            log.warning("metrics: inbox backlog left out of this scrape: %s", exc)
            return ScrapeReading(health_checks=checks)
        return ScrapeReading(
            inbox={str(status): snapshot.by_status.get(status, 0) for status in OPEN_STATUSES},
            retrying=snapshot.retrying,
            health_checks=checks,
        )

    def _store_check(self, status: CheckStatus, reason: str) -> HealthCheck:
        if self._store_health[0] is not status:
            self._store_health = (status, self.clock())
        return HealthCheck(status=status, reason=reason, since=self._store_health[1])

    def status_document(
        self, status: str, *, service: str = SERVICE_NAME, checks: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The JSON shared by /health, /stats and GET on the webhook."""
        self.tally.flush()  # this worker's own counts; the other workers' arrive within about a second
        snapshot = self.store.snapshot()
        counters, by_status = snapshot.counters, snapshot.by_status
        ignored = {
            name[len(IGNORED_COUNTER_PREFIX) :]: value
            for name, value in sorted(counters.items())
            if name.startswith(IGNORED_COUNTER_PREFIX)
        }
        return {
            "status": status,
            "service": service,
            "version": __version__,
            **({"checks": checks} if checks is not None else {}),
            "uptime_seconds": round(self.clock() - self.started_at, 1),
            "worker_pid": os.getpid(),
            "stats": {
                "messages_received": counters.get("messages_received", 0),
                "messages_processed": counters.get("messages_processed", 0),
                "messages_failed": counters.get("messages_failed", 0),
                "messages_skipped": counters.get("messages_skipped", 0),
                "messages_in_progress": sum(by_status.values()),
                "messages_queued": by_status.get("queued", 0),
                "messages_retrying": snapshot.retrying,
                "messages_undelivered": counters.get("messages_undelivered", 0),
                "chats_paused": dict(snapshot.paused),
                "chats_opted_out": snapshot.opted_out,
                "messages_ignored": sum(ignored.values()),
                "ignored_by_reason": ignored,
                "requests_rejected": counters.get("requests_rejected", 0),
                "requests_unauthorized": counters.get("requests_unauthorized", 0),
                "llm_cost_usd": round(counters.get(LLM_COST_COUNTER, 0) / 1e9, 6),
                "by_session": session_breakdown(counters),
                "server_started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds"),
            },
            "timestamp": utc_now_iso(),
        }
