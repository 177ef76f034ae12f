"""The conversation's rules as pure functions over plain values: who gets an answer, when to pause, in
what order to send, how long to wait. The store calls the decisions inside the write transaction that
loads their inputs and saves their results, so two workers can never both pass a limit."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from whatsapp_webhook.store_api import Admission, ChatLimits, FailureVerdict, SendVerdict, Turn, Verdict

PAUSED_FOREVER = 1e12  # an operator's "/bot off" lasts until "/bot on"
ECHO_MIN_CHARS = 40  # shorter words ("ok", "obrigado") are echoed by people all the time; a paragraph is not


class EveryMinute:
    """Log a recurring configuration error once a minute per key, with how many were not logged."""

    def __init__(self, *, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """None when this occurrence stays quiet; else how many were kept quiet since the last line."""
        now = self.clock()
        if key in self._last and now - self._last[key] < self.interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._quiet.pop(key, 0)

    def overdue(self, *, everything: bool = False) -> list[tuple[str, int]]:
        """The keys kept quiet for a whole interval (or all kept quiet, with `everything`), with their counts.

        For a summary line even when no new occurrence comes to report them; each starts a new interval.
        """
        now = self.clock()
        due = [
            (key, quiet)
            for key, quiet in self._quiet.items()
            if everything or now - self._last.get(key, now) >= self.interval
        ]
        for key, _ in due:
            del self._quiet[key]
            self._last[key] = now
        return due


def typing_pause_seconds(text: str, *, rng: Callable[[], float] = random.random) -> float:
    """A human-looking typing time: grows with the reply, 1-4 s, randomised (WAHA's anti-ban advice)."""
    return min(4.0, max(1.0, len(text) * 0.02)) * (0.8 + 0.4 * rng())


def trim_history(turns: Iterable[Turn], *, max_chars: int) -> list[Turn]:
    """Drop the oldest turns until the rest fit in max_chars and start with the customer's turn."""
    kept = list(turns)
    while kept and (sum(len(turn.content) for turn in kept) > max_chars or kept[0].role != "user"):
        kept = kept[1:]
    return kept


def retry_delay_seconds(attempt: int, *, base: float) -> float:
    """Our own retries of a failed send: slower than WAHA's redelivery (2 s), so that goes first."""
    growth: float = 3 ** (attempt - 1)  # an int, or a fraction for attempt < 1
    return min(base * growth, 15 * 60)


# --- who gets an answer ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RateWindow:
    """A chat's reply counts: this minute's and today's, and when it was last told it is over a limit."""

    minute_start: float = 0.0
    minute_count: int = 0
    day: str = ""  # UTC date, YYYY-MM-DD
    day_count: int = 0
    notice_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class LoopEvidence:
    """What the store knows about one text of the burst: how often the chat sent it lately, and whether
    it is (a long enough copy of) something we sent there."""

    chars: int
    repeats_in_window: int
    matches_our_reply: bool


def blocked_verdict(*, paused_until: float, opted_out: bool, now: float) -> Verdict | None:
    """A pause (a person answering, /bot off, a loop) or the customer's PARAR stops every reply."""
    if paused_until > now:
        return Verdict.PAUSED
    if opted_out:
        return Verdict.OPTED_OUT
    return None


def is_loop(evidence: Iterable[LoopEvidence], *, repeats: int) -> bool:
    """Another bot, not a person: the same message over and over, or our own longer reply echoed back."""
    return any(e.repeats_in_window >= repeats or (e.chars >= ECHO_MIN_CHARS and e.matches_our_reply) for e in evidence)


@dataclass(frozen=True, kw_only=True)
class RateDecision:
    admission: Admission
    window: RateWindow  # to save, whatever the verdict: replies beyond a limit still count


def count_reply(window: RateWindow, *, now: float, today: str, limits: ChatLimits) -> RateDecision:
    """Count one reply (a merged burst is one LLM call) against the minute and the day.

    Replies beyond a limit still count, so a flood cannot reset its own window, and the polite
    notice goes out at most once every `limits.notice_every` seconds.
    """
    minute_start, minute_count = (
        (now, 0) if now - window.minute_start >= 60 else (window.minute_start, window.minute_count)
    )
    day, day_count = (today, 0) if window.day != today else (window.day, window.day_count)
    minute_count, day_count = minute_count + 1, day_count + 1
    if day_count > limits.per_day:
        verdict = Verdict.DAILY_CAP
    elif minute_count > limits.per_minute:
        verdict = Verdict.RATE_LIMITED
    else:
        verdict = Verdict.OK
    notice = verdict is not Verdict.OK and now - window.notice_at >= limits.notice_every
    return RateDecision(
        admission=Admission(verdict=verdict, notice=notice),
        window=replace(
            window,
            minute_start=minute_start,
            minute_count=minute_count,
            day=day,
            day_count=day_count,
            notice_at=now if notice else window.notice_at,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class AdmissionDecision:
    """What admission decided and what the store saves with it, in the same transaction."""

    admission: Admission
    loop_pause_until: float | None = None  # a loop: pause the chat until then (reason "loop")
    window: RateWindow | None = None  # the reply counts to save (None: nothing was counted)


def decide_admission(
    *,
    paused_until: float,
    opted_out: bool,
    window: RateWindow,
    evidence: Callable[[], Iterable[LoopEvidence]],
    now: float,
    today: str,
    limits: ChatLimits,
) -> AdmissionDecision:
    """Whether a chat gets an answer, in this order: a pause or the customer's opt-out, a loop, then the
    rate limits. `evidence` is asked for only when the chat is not blocked (it costs the store a query)."""
    blocked = blocked_verdict(paused_until=paused_until, opted_out=opted_out, now=now)
    if blocked is not None:
        return AdmissionDecision(admission=Admission(verdict=blocked))
    if is_loop(evidence(), repeats=limits.loop_repeats):
        return AdmissionDecision(admission=Admission(verdict=Verdict.LOOP), loop_pause_until=now + limits.loop_pause)
    decision = count_reply(window, now=now, today=today, limits=limits)
    return AdmissionDecision(admission=decision.admission, window=decision.window)


# The chat_state columns an admission reads, in the order decide_admission_from_state takes them.
ADMISSION_STATE_COLUMNS = "paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at"


def decide_admission_from_state(
    state: Sequence[Any], *, evidence: Callable[[], Iterable[LoopEvidence]], now: float, limits: ChatLimits
) -> AdmissionDecision:
    """decide_admission over a chat's stored state (ADMISSION_STATE_COLUMNS, as both stores read it)."""
    paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at = state
    return decide_admission(
        paused_until=paused_until,
        opted_out=bool(opted_out),
        window=RateWindow(
            minute_start=minute_start, minute_count=minute_count, day=day, day_count=day_count, notice_at=notice_at
        ),
        evidence=evidence,
        now=now,
        today=datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"),
        limits=limits,
    )


# --- pauses and sends ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Pause:
    until: float  # 0 = not paused
    reason: str | None


def later_pause(current: Pause, *, until: float, reason: str) -> Pause:
    """Resuming (until=0) always wins; otherwise the later pause wins, so a reply typed by a person
    cannot shorten an operator's open-ended "/bot off"."""
    if until == 0:
        return Pause(until=0, reason=None)
    if until > current.until:
        return Pause(until=until, reason=reason)
    return current


def send_verdict(
    *,
    holds_lease: bool,
    already_sending: bool,
    earlier_open: bool,
    paused: bool,
    sends: int = 0,
    max_sends: int | None = None,
) -> SendVerdict:
    """The last check before sendText. A reply whose sending began is finished whatever happens
    meanwhile (half an answer is worse than a whole one); one not begun yields to a message the
    customer sent earlier, and stays unsent once a person took the chat over. A message that already
    went to sendText `max_sends` times (our retries and WAHA's redeliveries together) goes no more."""
    if not holds_lease:
        return SendVerdict.LOST
    if max_sends is not None and sends >= max_sends:
        return SendVerdict.SPENT
    if already_sending:
        return SendVerdict.SEND
    if earlier_open:
        return SendVerdict.YIELD
    return SendVerdict.PAUSED if paused else SendVerdict.SEND


def failure_verdict(*, holds_lease: bool, attempts: int, max_attempts: int) -> FailureVerdict:
    """After a failed attempt: try again later, or give up once the attempts are used."""
    if not holds_lease:
        return FailureVerdict.LOST
    return FailureVerdict.FAILED if attempts >= max_attempts else FailureVerdict.RETRY
