"""The conversation rules as pure functions: no store, no clock, just values in and decisions out."""

from __future__ import annotations

import pytest

from whatsapp_webhook.policy import (
    ECHO_MIN_CHARS,
    LoopEvidence,
    Pause,
    RateWindow,
    blocked_verdict,
    count_reply,
    failure_verdict,
    is_loop,
    later_pause,
    send_verdict,
    trim_history,
)
from whatsapp_webhook.store_api import ChatLimits, FailureVerdict, SendVerdict, Turn, Verdict

LIMITS = ChatLimits(per_minute=2, per_day=4, loop_repeats=5, loop_window=120, loop_pause=3600)
NOW = 1_700_000_000.0


@pytest.mark.parametrize("paused_until, opted_out, verdict", [
    (NOW + 1, False, Verdict.PAUSED), (NOW + 1, True, Verdict.PAUSED), (NOW - 1, True, Verdict.OPTED_OUT),
    (NOW, False, None), (0, False, None),
])
def test_a_pause_or_an_opt_out_blocks_every_reply(paused_until, opted_out, verdict) -> None:
    assert blocked_verdict(paused_until=paused_until, opted_out=opted_out, now=NOW) == verdict


def test_replies_count_against_the_minute_and_the_day_and_a_flood_cannot_reset_its_window() -> None:
    window, verdicts = RateWindow(), []
    for second in (0, 1, 2, 61, 62):
        decision = count_reply(window, now=NOW + second, today="2023-11-14", limits=LIMITS)
        verdicts.append((decision.admission.verdict, decision.admission.notice))
        window = decision.window
    assert verdicts == [(Verdict.OK, False), (Verdict.OK, False), (Verdict.RATE_LIMITED, True),
                        (Verdict.OK, False), (Verdict.DAILY_CAP, False)]  # the notice waits an hour
    assert window.day_count == 5  # replies beyond a limit still count
    tomorrow = count_reply(window, now=NOW + 90_000, today="2023-11-15", limits=LIMITS)
    assert tomorrow.admission.verdict is Verdict.OK and tomorrow.window.day_count == 1


def test_the_notice_goes_out_again_after_an_hour() -> None:
    window = RateWindow(minute_start=NOW, minute_count=5, day="d", day_count=1, notice_at=NOW - 3600)
    assert count_reply(window, now=NOW, today="d", limits=LIMITS).admission.notice is True
    window = RateWindow(minute_start=NOW, minute_count=5, day="d", day_count=1, notice_at=NOW - 3599)
    assert count_reply(window, now=NOW, today="d", limits=LIMITS).admission.notice is False


def test_a_loop_is_the_same_text_over_and_over_or_our_long_reply_echoed() -> None:
    assert is_loop([LoopEvidence(chars=2, repeats_in_window=5, matches_our_reply=False)], repeats=5)
    assert not is_loop([LoopEvidence(chars=2, repeats_in_window=4, matches_our_reply=True)], repeats=5)  # "ok"
    assert is_loop([LoopEvidence(chars=ECHO_MIN_CHARS, repeats_in_window=1, matches_our_reply=True)], repeats=5)
    assert not is_loop([], repeats=5)


def test_the_later_pause_wins_and_resuming_always_wins() -> None:
    operator = Pause(until=1e12, reason="operator")
    assert later_pause(operator, until=NOW + 3600, reason="handoff") == operator
    assert later_pause(operator, until=0, reason="handoff") == Pause(until=0, reason=None)
    handoff = Pause(until=NOW + 60, reason="handoff")
    assert later_pause(handoff, until=NOW + 3600, reason="loop") == Pause(until=NOW + 3600, reason="loop")
    assert later_pause(Pause(until=0, reason=None), until=0, reason="operator") == Pause(until=0, reason=None)


@pytest.mark.parametrize("holds_lease, already_sending, earlier_open, paused, verdict", [
    (False, False, False, False, SendVerdict.LOST),
    (False, True, True, True, SendVerdict.LOST),
    (True, True, True, True, SendVerdict.SEND),  # half an answer is worse than a whole one
    (True, False, True, False, SendVerdict.YIELD),
    (True, False, True, True, SendVerdict.YIELD),  # the earlier message goes first, even if paused now
    (True, False, False, True, SendVerdict.PAUSED),
    (True, False, False, False, SendVerdict.SEND),
])
def test_the_last_check_before_send(holds_lease, already_sending, earlier_open, paused, verdict) -> None:
    assert send_verdict(holds_lease=holds_lease, already_sending=already_sending, earlier_open=earlier_open,
                        paused=paused) is verdict


def test_a_message_sent_max_sends_times_is_never_sent_again_even_mid_reply() -> None:
    common = dict(holds_lease=True, earlier_open=False, paused=False, max_sends=3)
    assert send_verdict(already_sending=False, sends=2, **common) is SendVerdict.SEND
    assert send_verdict(already_sending=False, sends=3, **common) is SendVerdict.SPENT
    assert send_verdict(already_sending=True, sends=3, **common) is SendVerdict.SPENT
    assert send_verdict(holds_lease=False, already_sending=False, earlier_open=False, paused=False, sends=9,
                        max_sends=3) is SendVerdict.LOST
    assert send_verdict(already_sending=False, sends=500, holds_lease=True, earlier_open=False,
                        paused=False) is SendVerdict.SEND  # no bound given


def test_a_failed_attempt_is_retried_until_the_attempts_are_used() -> None:
    assert failure_verdict(holds_lease=True, attempts=2, max_attempts=3) is FailureVerdict.RETRY
    assert failure_verdict(holds_lease=True, attempts=3, max_attempts=3) is FailureVerdict.FAILED
    assert failure_verdict(holds_lease=False, attempts=1, max_attempts=3) is FailureVerdict.LOST


def test_history_is_trimmed_from_the_oldest_and_starts_with_the_customer() -> None:
    turns = [Turn(role="user", content="a" * 10), Turn(role="assistant", content="b" * 10),
             Turn(role="user", content="c" * 10), Turn(role="assistant", content="d" * 10)]
    assert trim_history(turns, max_chars=40) == turns
    assert trim_history(turns, max_chars=30) == turns[2:]  # never starts with the bot's turn
    assert trim_history(turns, max_chars=5) == []


def test_admission_from_a_stored_chat_state_reads_its_columns_and_counts_the_utc_day() -> None:
    from datetime import UTC, datetime

    from whatsapp_webhook.policy import decide_admission_from_state
    from whatsapp_webhook.store_api import ChatLimits, Verdict

    limits = ChatLimits(per_minute=5, per_day=2, loop_repeats=3, loop_window=60, loop_pause=600)
    last_second = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC).timestamp()

    def state(*, opted_out: object = 0, day: str = "2026-12-01", day_count: int = 2) -> tuple[object, ...]:
        # ADMISSION_STATE_COLUMNS: paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at
        return (0.0, opted_out, 0.0, 0, day, day_count, 0.0)

    def verdict(row: tuple[object, ...], now: float = last_second) -> Verdict:
        return decide_admission_from_state(row, evidence=list, now=now, limits=limits).admission.verdict

    assert verdict(state(opted_out=1)) is verdict(state(opted_out=True)) is Verdict.OPTED_OUT  # SQLite's 1, PG's true
    assert verdict(state()) is Verdict.DAILY_CAP  # two replies today already
    assert verdict(state(), now=last_second + 1) is Verdict.OK  # a new day in UTC: the count starts again


def test_admission_checks_pauses_then_loops_then_limits_and_loads_loop_evidence_only_when_needed() -> None:
    from whatsapp_webhook.policy import LoopEvidence, RateWindow, decide_admission
    from whatsapp_webhook.store_api import ChatLimits, Verdict

    limits = ChatLimits(per_minute=1, per_day=10, loop_repeats=3, loop_window=60, loop_pause=600)
    asked: list[bool] = []

    def evidence(repeats: int) -> list[LoopEvidence]:
        asked.append(True)
        return [LoopEvidence(chars=10, repeats_in_window=repeats, matches_our_reply=False)]

    common = dict(window=RateWindow(), now=1000.0, today="2026-12-01", limits=limits)
    paused = decide_admission(paused_until=2000.0, opted_out=False, evidence=lambda: evidence(9), **common)
    assert (paused.admission.verdict, paused.window, asked) == (Verdict.PAUSED, None, [])
    loop = decide_admission(paused_until=0.0, opted_out=False, evidence=lambda: evidence(3), **common)
    assert (loop.admission.verdict, loop.loop_pause_until, loop.window) == (Verdict.LOOP, 1600.0, None)
    ok = decide_admission(paused_until=0.0, opted_out=False, evidence=lambda: evidence(1), **common)
    assert ok.admission.verdict is Verdict.OK and ok.window is not None and ok.window.minute_count == 1
