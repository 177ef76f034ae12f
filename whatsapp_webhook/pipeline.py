"""The reply pipeline: one claimed message (and the burst merged into it) from the LLM call to sendText."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import (
    Awaitable,
    Callable,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from whatsapp_webhook.admission import UNLIMITED_COMMANDS, ChatAdmission, is_worn_out, written_reply
from whatsapp_webhook.business import BusinessProfiles, OutOfHoursAction, SessionProfile
from whatsapp_webhook.business_gate import BusinessGate
from whatsapp_webhook.events import bare_message_id
from whatsapp_webhook.formatting import markdown_to_whatsapp, split_message
from whatsapp_webhook.health import CheckStatus, HealthReporter
from whatsapp_webhook.llm import ModelUnavailableError
from whatsapp_webhook.logs import MessageLog, log
from whatsapp_webhook.media import NOTE_INSTRUCTION, strip_media_note
from whatsapp_webhook.media_reply import MediaRefusal, MediaTurns, fixed_stand_in, has_media
from whatsapp_webhook.metrics import (
    MESSAGES_FAILED,
    MESSAGES_PROCESSED,
    MESSAGES_SKIPPED,
    PROCESSING_SECONDS,
)
from whatsapp_webhook.policy import (
    EveryMinute,
    retry_delay_seconds,
    typing_pause_seconds,
)
from whatsapp_webhook.store_api import (
    FailureVerdict,
    InboxStatus,
    Outcome,
    SendVerdict,
    StoreUnavailable,
    Turn,
    Verdict,
)
from whatsapp_webhook.upstream import LLMError, WahaError

if TYPE_CHECKING:
    from whatsapp_webhook.events import IncomingMessage
    from whatsapp_webhook.hours import HoursStatus
    from whatsapp_webhook.llm import LLMClient, LLMReply
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import ClaimedMessage, Store
    from whatsapp_webhook.waha import WahaClient

T = TypeVar("T")
P = ParamSpec("P")

PRESENCE_TIMEOUT_SECONDS = 3.0

# Formatting and splitting cost ~0.4 µs a character: up to this length on the loop (< 0.5 ms, less than a
# thread hop, which under load waits behind store calls); longer, maybe hostile, texts on a thread.
INLINE_TEXT_CHARS = 1000


# WhatsApp timestamps our messages with the phone's/server's clock, not ours.
CLOCK_SKEW_SECONDS = 10.0


async def off_loop_if_long(
    transform: Callable[Concatenate[str, P], T], text: str, *args: P.args, **kwargs: P.kwargs
) -> T:
    """`transform(text, ...)`, on a worker thread when `text` is too long for the loop (INLINE_TEXT_CHARS)."""
    if len(text) <= INLINE_TEXT_CHARS:
        return transform(text, *args, **kwargs)
    return await asyncio.to_thread(transform, text, *args, **kwargs)


@dataclass(frozen=True, kw_only=True)
class ComposedReply:
    """What to send for a message: the text, its outcome, the turn to remember and what the LLM charged."""

    text: str
    outcome: Outcome
    history: tuple[Turn, Turn] | None = None
    llm_cost_usd: float = 0.0


def message_log(message: IncomingMessage) -> MessageLog:
    """The log bound to one customer message: every line names its event and chat, as data."""
    return MessageLog(event=message.event_id, chat=message.chat_id)


class ReplyPipeline:
    """Answers one claimed message (and the burst merged into it) and records the outcome in the inbox."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        llm: LLMClient,
        waha: WahaClient,
        health: HealthReporter | None = None,
        profiles: BusinessProfiles | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        media: MediaTurns | None = None,
    ) -> None:
        self.settings = settings
        self.media = media if settings.media_enabled else None  # None: media gets NON_TEXT_REPLY, as before
        self.store = store
        self.llm = llm
        self.waha = waha
        self.health = health or HealthReporter(store=store)
        self.profiles = profiles or BusinessProfiles(settings, llm=llm)
        self.sleep = sleep
        self.rng = rng
        self.clock = clock  # wall time (unix seconds), as the store's and WhatsApp's timestamps are
        self._notices = EveryMinute()
        self.business = BusinessGate(profiles=self.profiles, store=store, health=self.health, clock=clock)
        self.admission = ChatAdmission(
            settings=settings, store=store, profiles=self.profiles, media_on=self.media is not None, clock=clock
        )

    async def _report(self, name: str, status: CheckStatus, reason: str) -> None:
        """Tell /health what this reply learned; costs a store write only when something changed."""
        if self.health.needs_write(name, status, reason):
            await asyncio.to_thread(self.health.report, name, status, reason)

    async def process(self, claimed: ClaimedMessage) -> None:
        message = claimed.message
        try:
            await self._reply(claimed)
        except BaseException as exc:
            mlog, key = message_log(message), {"key": message.dedupe_key}
            if isinstance(exc, StoreUnavailable):
                # Not handed back due at once: the store refusing writes (a full disk) would turn that into a
                # loop of LLM calls. The lease runs out instead and any worker retries it then.
                mlog.error(
                    "state store failed mid-reply key=%(key)s: %(error)s; retried when its lease runs out",
                    {**key, "error": str(exc)},
                )
                raise
            # A bug or a shutdown: the message goes back to the inbox, due at once. When even that write
            # fails, its lease runs out and any worker takes it over then.
            try:
                await asyncio.shield(asyncio.to_thread(self.store.release, message.dedupe_key, claimed.lease_owner))
            except StoreUnavailable as release_error:
                mlog.error(
                    "could not hand key=%(key)s back to the inbox (%(error)s): it is retried when its lease runs "
                    "out and the store takes writes again",
                    {**key, "error": str(release_error)},
                )
                raise exc from None
            if isinstance(exc, asyncio.CancelledError):
                mlog.info("reply interrupted by shutdown; key=%(key)s handed back to the inbox", key)
            else:
                mlog.exception("reply failed in our code; key=%(key)s handed back to the inbox", key)
            raise

    async def _reply(self, claimed: ClaimedMessage) -> None:
        message, owner, key = claimed.message, claimed.lease_owner, claimed.message.dedupe_key
        mlog = message_log(message)
        mlog.info(
            "decision=%(decision)s attempt=%(attempt)d merged=%(merged)d",
            {"decision": "working", "attempt": claimed.attempts, "merged": len(claimed.merged)},
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        parts_sent = claimed.parts_sent
        typing_since: float | None = None  # set when typing already shows (it started with the LLM call)
        claimed_text = written_reply(claimed)  # a reply whose sending began is finished word for word
        claimed_reply = claimed_text is not None
        if is_worn_out(claimed, max_attempts=self.settings.reply_max_attempts):
            # Taken more often than REPLY_MAX_ATTEMPTS without an attempt ending (the store kept refusing the
            # reply's writes, or workers kept dying on it): give up rather than call the LLM without end.
            await self._record_failure(
                claimed,
                f"taken {claimed.attempts} times and no attempt ended (REPLY_MAX_ATTEMPTS): the state store kept "
                "failing mid-reply, or workers kept dying",
            )
            return
        if claimed_text is not None:
            # A reply was already written (and maybe partly sent): the customer must get exactly it.
            text, outcome, history = claimed_text, claimed.outcome or Outcome.SUCCESS, None
            if claimed.outcome is Outcome.SUCCESS:
                said = fixed_stand_in(claimed) if has_media(claimed) else "\n".join(claimed.texts)
                history = (Turn(role="user", content=said), Turn(role="assistant", content=text))
            parts = await off_loop_if_long(split_message, text, self.settings.max_message_chars)
            # The worker before us died mid-send: did that part leave?
            if (
                claimed.previous_status is InboxStatus.SENDING
                and parts_sent < len(parts)
                and await self._already_sent(
                    claimed,
                    part=parts[parts_sent],
                    index=parts_sent,
                    since=(claimed.send_started_at or self.clock()) - CLOCK_SKEW_SECONDS,
                )
            ):
                parts_sent += 1
        else:
            presence = None
            if self.settings.typing_simulation:
                # Seen + typing while the LLM thinks, so the typing pause overlaps the LLM call.
                presence = asyncio.create_task(self._show_typing(message))
            try:
                composed = await self._compose(claimed)
            except BaseException:
                if presence is not None:
                    presence.cancel()
                raise
            if presence is not None:
                await presence
                typing_since = started
            if composed is None:  # deliberately not answered (paused, opted out, loop, over a limit)
                await self._finish(claimed, outcome=Outcome.SKIPPED, sent_message_id=None)
                if presence is not None:
                    await self._quietly(
                        "stopTyping", self.waha.stop_typing(session=message.session, chat_id=message.chat_id)
                    )
                return
            text, outcome, history, cost = composed.text, composed.outcome, composed.history, composed.llm_cost_usd
            parts, parts_sent = await off_loop_if_long(split_message, text, self.settings.max_message_chars), 0

        verdict = await asyncio.to_thread(
            self.store.begin_send,
            key,
            owner,
            parts=parts[parts_sent:],
            reply=None if claimed_reply else (text, outcome),
            llm_cost_usd=0.0 if claimed_reply else cost,
            max_sends=self.settings.reply_max_sends,
        )
        if verdict is SendVerdict.PAUSED:
            mlog.info(
                "decision=%(decision)s reason=%(reason)s (a person took over while the reply was being written)",
                {"decision": "skipped", "reason": "paused"},
            )
            await self._finish(claimed, outcome=Outcome.SKIPPED, sent_message_id=None)
            return
        if verdict is SendVerdict.SPENT:
            MESSAGES_FAILED.labels("undelivered").inc(1 + len(claimed.merged))
            mlog.error(
                "decision=%(decision)s key=%(key)s sends=%(sends)d (REPLY_MAX_SENDS): given up, not sent again",
                {"decision": "send_failed", "key": key, "sends": self.settings.reply_max_sends},
            )
            if self.settings.typing_simulation:
                await self._quietly(
                    "stopTyping", self.waha.stop_typing(session=message.session, chat_id=message.chat_id)
                )
            return
        if verdict is not SendVerdict.SEND:
            why = "an earlier message of this chat goes first" if verdict is SendVerdict.YIELD else "lease lost"
            mlog.info("decision=%(decision)s (" + why + ")", {"decision": str(verdict)})
            return
        sent_id = last_part_id = None
        for index in range(parts_sent, len(parts)):
            await self._type(message, parts[index], since=typing_since)
            typing_since = None
            send_started = self.clock()
            try:
                part_id = await self.waha.send_text(
                    session=message.session,
                    chat_id=message.chat_id,
                    text=parts[index],
                    reply_to=message.message_id if message.is_group and index == 0 else None,
                )
            except WahaError as exc:
                await self._report_waha_failure(message.session, exc)
                if exc.maybe_delivered and await self._already_sent(
                    claimed, part=parts[index], index=index, since=send_started - CLOCK_SKEW_SECONDS
                ):
                    continue
                await self._record_failure(claimed, str(exc))
                return
            if index == parts_sent:
                await self._report(
                    f"waha:{message.session}", CheckStatus.OK, f"sendText works for WAHA session '{message.session}'"
                )
            sent_id = sent_id or part_id
            if index == len(parts) - 1:
                last_part_id = part_id  # finish() records the last part in the same step
                break
            if not await asyncio.to_thread(
                self.store.mark_part_sent, key, owner, parts_sent=index + 1, sent_message_id=part_id
            ):
                mlog.warning("lease lost after part %(part)d; the new owner continues", {"part": index + 1})
                return
        await self._finish(
            claimed,
            outcome=outcome,
            sent_message_id=sent_id,
            history=history,
            last_part_id=last_part_id,
            llm_cost_usd=0.0 if claimed_reply else cost,
        )
        mlog.info(
            "decision=%(decision)s outcome=%(outcome)s parts=%(parts)d chars=%(chars)d sent_id=%(sent_id)s"
            " total_ms=%(total_ms).0f",
            {
                "decision": "replied",
                "outcome": str(outcome),
                "parts": len(parts),
                "chars": len(text),
                "sent_id": sent_id,
                "total_ms": (loop.time() - started) * 1000,
            },
        )

    async def _report_waha_failure(self, session: str, exc: WahaError) -> None:
        if exc.status == 401:
            await self._report(
                f"waha:{session}",
                CheckStatus.FAILING,
                "WAHA rejected WAHA_API_KEY (HTTP 401): set it to the key WAHA was started with",
            )
        elif exc.status == 422:
            await self._report(
                f"waha:{session}",
                CheckStatus.DEGRADED,
                f"WAHA session '{session}' is not WORKING (sendText answered HTTP 422)",
            )
        else:
            await self._report(f"waha:{session}", CheckStatus.DEGRADED, f"sendText failed: {exc}")

    async def _compose(self, claimed: ClaimedMessage) -> ComposedReply | None:
        """The reply's text, its outcome and the turn to remember; None when this chat gets no reply now."""
        message, settings = claimed.message, self.settings
        command = settings.command_of(message.text)
        context = message_log(message)
        profile = self.profiles.profile(message.session)
        if not profile.enabled:
            context.info(
                "decision=%(decision)s reason=%(reason)s", {"decision": "skipped", "reason": "session_disabled"}
            )
            return None
        if command in UNLIMITED_COMMANDS:
            paused = await asyncio.to_thread(self.store.set_opted_out, message.chat_key, command == "stop")
            context.info(
                "decision=%(decision)s" + (" (chat paused: no confirmation sent)" if paused else ""),
                {"decision": "opted_out" if command == "stop" else "opted_in"},
            )
            # While a person handles the chat, the bot stays silent even to confirm.
            return (
                None
                if paused
                else ComposedReply(
                    text=settings.stop_reply if command == "stop" else settings.start_reply, outcome=Outcome.COMMAND
                )
            )
        with_media = self.media is not None and has_media(claimed)
        admitted = await self.admission.admitted(claimed, command)
        admission, history = admitted.admission, admitted.history
        if admission.verdict is not Verdict.OK:
            context.info(
                "decision=%(decision)s reason=%(reason)s notice=%(notice)s",
                {"decision": "skipped", "reason": str(admission.verdict), "notice": admission.notice},
            )
            if admission.verdict is Verdict.LOOP:
                context.warning("bot-to-bot loop suspected: chat paused for %.0f min", settings.loop_pause_minutes)
            return ComposedReply(text=settings.rate_limit_reply, outcome=Outcome.NOTICE) if admission.notice else None
        if command == "reset":
            await asyncio.to_thread(self.store.clear_history, message.chat_key)
            context.info("decision=%(decision)s", {"decision": "history_reset"})
            return ComposedReply(text=settings.reset_reply, outcome=Outcome.COMMAND)
        hours = profile.hours(self.clock())
        closed = await self.business.out_of_hours(message.chat_key, profile, hours, context)
        if closed is not OutOfHoursAction.ANSWER:
            notice = closed is OutOfHoursAction.NOTICE
            return ComposedReply(text=profile.notice(hours), outcome=Outcome.NOTICE) if notice else None
        media_turn = await self.media.compose(claimed, context) if with_media and self.media is not None else None
        if isinstance(media_turn, MediaRefusal):
            return ComposedReply(text=media_turn.text, outcome=media_turn.outcome)
        if media_turn is None and not claimed.texts:
            return ComposedReply(text=settings.non_text_reply, outcome=Outcome.NON_TEXT)
        user_turn = "\n".join(claimed.texts)
        try:
            if not await self.business.within_budget(profile, context):
                return ComposedReply(text=profile.settings.fallback_message, outcome=Outcome.FALLBACK)
            reply = await self._ask_llm(
                message,
                media_turn.content if media_turn is not None else user_turn,
                history,
                context,
                profile=profile,
                hours=hours,
                instructions=NOTE_INSTRUCTION if media_turn is not None else None,
            )
        finally:
            if media_turn is not None and self.media is not None:
                await asyncio.shield(self.media.done(media_turn))
        cost = (reply.cost_usd or 0.0) if reply is not None else 0.0
        await self.business.record_spend(profile, cost)
        answer = reply.text if reply is not None else ""
        # The note is for the history only: it never reaches the customer, even on a text-only turn
        # (the model may write one after an earlier turn's media).
        noted = strip_media_note(answer)
        answer = noted.text
        if media_turn is not None:
            user_turn = media_turn.history_text(noted.note)
        formatted = await off_loop_if_long(markdown_to_whatsapp, answer) if answer else ""
        # Nothing left after formatting (an LLM answering only '---', or no LLM reply at all) is no answer.
        if not formatted or reply is None:
            return ComposedReply(text=profile.settings.fallback_message, outcome=Outcome.FALLBACK, llm_cost_usd=cost)
        # History keeps the LLM's own Markdown: fed WhatsApp marks, it would start writing them back.
        turns = (Turn(role="user", content=user_turn), Turn(role="assistant", content=answer))
        return ComposedReply(text=formatted, outcome=Outcome.SUCCESS, history=turns, llm_cost_usd=cost)

    async def _ask_llm(
        self,
        message: IncomingMessage,
        user_turn: str | list[dict[str, Any]],
        history: list[Turn],
        context: MessageLog,
        *,
        profile: SessionProfile,
        hours: HoursStatus,
        instructions: str | None = None,
    ) -> LLMReply | None:
        # OpenRouter's abuse tracking wants a stable end-user id; a hash never reveals the number.
        user = hashlib.sha256(message.chat_id.encode("utf-8")).hexdigest()[:32]
        for attempt_history in (history, []):
            # Reading the knowledge files (only when they changed) is file I/O: off the event loop.
            prompt = (
                await asyncio.to_thread(profile.prompt, hours, attempt_history, user_turn, instructions)
                if profile.knowledge.enabled
                else profile.prompt(hours, attempt_history, user_turn, instructions)
            )
            try:
                reply = await (profile.llm or self.llm).complete(prompt, user=user, log=context)
            except LLMError as exc:
                if exc.status == 400 and "context" in str(exc).lower() and attempt_history:
                    context.warning("prompt too long for the model; retrying without history")
                    continue
                context.error("llm_failed=%(llm_failed)s -> fallback", {"llm_failed": str(exc)})
                await self._report_llm_failure(exc)
                return None
            context.info(
                "llm_ok model=%(model)s attempts=%(attempts)d llm_ms=%(llm_ms).0f tokens=%(tokens)s"
                " history_turns=%(history_turns)d",
                {
                    "model": reply.model,
                    "attempts": reply.attempts,
                    "llm_ms": reply.latency_seconds * 1000,
                    "tokens": reply.usage.get("total_tokens"),
                    "history_turns": len(attempt_history),
                },
            )
            await self._report_llm_success(reply, context)
            return reply
        return None

    async def _report_llm_success(self, reply: LLMReply, context: MessageLog) -> None:
        configured = reply.configured_model
        if not reply.from_fallback:
            await self._report("llm", CheckStatus.OK, f"replies come from OPENROUTER_MODEL={configured}")
            return
        why = "is not served" if configured in reply.unserved_models else "did not answer"
        await self._report(
            "llm",
            CheckStatus.DEGRADED,
            f"OPENROUTER_MODEL={configured} {why}; replies come from the fallback {reply.answered_by}",
        )
        quiet = self._notices.due("fallback")
        if quiet is not None:
            context.warning(
                "llm decision=%(decision)s model=%(model)s configured=%(configured)s: OPENROUTER_MODEL "
                + why
                + ", so a fallback model answered; check the id with `python whatsapp_webhook_server.py --check`"
                + (f" ({quiet} more in the last minute)" if quiet else ""),
                {"decision": "fallback_model", "model": reply.model, "configured": configured},
            )

    async def _report_llm_failure(self, exc: LLMError) -> None:
        if isinstance(exc, ModelUnavailableError):
            models = ", ".join(self.llm.models)
            await self._report(
                "llm",
                CheckStatus.FAILING,
                f"no configured model is served ({models}): customers "
                "get FALLBACK_MESSAGE; set OPENROUTER_MODEL to an id that --check lists",
            )
        elif exc.status in (401, 402):
            what = "rejected OPENROUTER_API_KEY" if exc.status == 401 else "says the account is out of credits"
            await self._report(
                "llm", CheckStatus.FAILING, f"the LLM server {what} (HTTP {exc.status}): customers get FALLBACK_MESSAGE"
            )
        elif exc.transient:
            await self._report("llm", CheckStatus.DEGRADED, f"the last reply fell back to FALLBACK_MESSAGE: {exc}")

    async def _type(self, message: IncomingMessage, part: str, *, since: float | None) -> None:
        """WAHA's anti-ban recipe before each part: typing for a human-looking time, then stop typing."""
        if not self.settings.typing_simulation:
            return
        loop = asyncio.get_running_loop()
        if since is None:  # a later part: typing starts now
            await self._quietly("startTyping", self.waha.start_typing(session=message.session, chat_id=message.chat_id))
            since = loop.time()
        remaining = typing_pause_seconds(part, rng=self.rng) - (loop.time() - since)
        if remaining > 0:
            await self.sleep(remaining)
        await self._quietly("stopTyping", self.waha.stop_typing(session=message.session, chat_id=message.chat_id))

    async def _record_failure(self, claimed: ClaimedMessage, error: str) -> None:
        """An attempt that ended without a reply: due again after the backoff, or given up once attempts are used."""
        message = claimed.message
        result = await asyncio.to_thread(
            self.store.record_failure,
            message.dedupe_key,
            claimed.lease_owner,
            error,
            max_attempts=self.settings.reply_max_attempts,
            retry_in=retry_delay_seconds(claimed.attempts, base=self.settings.reply_retry_seconds),
        )
        if result is FailureVerdict.FAILED:
            MESSAGES_FAILED.labels("undelivered").inc(1 + len(claimed.merged))
        message_log(message).error(
            "decision=%(decision)s key=%(key)s attempt=%(attempt)d then=%(then)s error=%(error)s",
            {
                "decision": "send_failed",
                "key": message.dedupe_key,
                "attempt": claimed.attempts,
                "then": str(result),
                "error": error,
            },
        )

    async def _finish(
        self,
        claimed: ClaimedMessage,
        *,
        outcome: Outcome,
        sent_message_id: str | None,
        history: tuple[Turn, Turn] | None = None,
        last_part_id: str | None = None,
        llm_cost_usd: float = 0.0,
    ) -> None:
        count = 1 + len(claimed.merged)
        session = claimed.message.session
        finished = await asyncio.to_thread(
            self.store.finish,
            claimed.message.dedupe_key,
            claimed.lease_owner,
            outcome=outcome,
            sent_message_id=sent_message_id,
            history=history,
            last_part_id=last_part_id,
            counts=self.business.finished_counts(session, str(outcome), count, llm_cost_usd),
        )
        if not finished:  # another worker took the message over and finishes (and counts) it
            return
        self.business.count_finished(session, str(outcome), count, llm_cost_usd)
        if outcome is Outcome.FALLBACK:
            MESSAGES_FAILED.labels("llm").inc(count)
        elif outcome in (Outcome.SKIPPED, Outcome.NOTICE):
            MESSAGES_SKIPPED.inc(count)
        else:
            MESSAGES_PROCESSED.inc(count)
        if outcome is not Outcome.SKIPPED:  # the histogram is about replies reaching WAHA
            PROCESSING_SECONDS.observe(max(0.0, self.clock() - claimed.received_at))

    async def _already_sent(self, claimed: ClaimedMessage, *, part: str, index: int, since: float) -> bool:
        """A send was cut off (worker died, answer lost): ask WAHA whether the part left before resending it."""
        message = claimed.message
        try:
            candidates = await self.waha.find_sent_texts(
                session=message.session, chat_id=message.chat_id, text=part, since=since
            )
            # The same words may have gone out for an earlier message (two voice notes, two fallbacks):
            # only a copy no other reply of ours accounts for can be this one.
            ids = [c.get("id") if isinstance(c.get("id"), str) else None for c in candidates]
            known = await asyncio.to_thread(self.store.known_sent_ids, [i for i in ids if i])
        except WahaError as exc:
            # Cannot tell: a possible second copy is better than a customer left without an answer.
            message_log(message).warning(
                "cannot check whether the interrupted send went out (%(error)s); will send", {"error": str(exc)}
            )
            return False
        unaccounted = [i for i in ids if i is None or bare_message_id(i) not in known]
        if not unaccounted:
            return False
        sent_id = unaccounted[0]
        await asyncio.to_thread(
            self.store.mark_part_sent,
            message.dedupe_key,
            claimed.lease_owner,
            parts_sent=index + 1,
            sent_message_id=sent_id,
        )
        message_log(message).info(
            "decision=%(decision)s part=%(part)d sent_id=%(sent_id)s (found in WAHA after an interrupted send)",
            {"decision": "already_sent", "part": index + 1, "sent_id": sent_id},
        )
        return True

    async def _show_typing(self, message: IncomingMessage) -> None:
        await self._quietly(
            "sendSeen",
            self.waha.send_seen(
                session=message.session,
                chat_id=message.chat_id,
                message_id=message.message_id,
                participant=message.participant if message.is_group else None,
            ),
        )
        await self._quietly("startTyping", self.waha.start_typing(session=message.session, chat_id=message.chat_id))

    async def _quietly(self, what: str, call: Awaitable[None]) -> None:
        """Presence calls are cosmetic: their failure or slowness must never cost the customer the reply."""
        try:
            async with asyncio.timeout(PRESENCE_TIMEOUT_SECONDS):
                await call
        except (WahaError, TimeoutError) as exc:
            log.warning("%s failed (ignored): %s", what, str(exc) or "timed out")
