"""The state store's behavioural suite: what the server relies on, through the Store interface only.

Every backend runs it unchanged (BACKENDS). It covers intake dedupe, claims and leases, per-chat order
and yielding, debounce merging, retries and give-up, restart recovery, pruning, history, pauses,
opt-outs, limits, loop detection, counters, media bytes and health reports.
SQLite-only behaviour (group commit, several processes, upgrades of old files) is in test_sqlite_store.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import waha_payloads as wp
from tests import postgres
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.health import CheckStatus
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import (
    Acceptance,
    Admission,
    AdmissionRequest,
    ChatLimits,
    ClaimedMessage,
    MediaJobState,
    MediaJobStatus,
    Outcome,
    SendVerdict,
    Store,
    Turn,
    Verdict,
)
from whatsapp_webhook.store_schema import LLM_COST_COUNTER


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


# name -> a store on a folder (the PostgreSQL one: a schema of the session's server, tests/postgres.py).
BACKENDS: dict[str, Callable[[Path, Clock], Store]] = {
    "sqlite": lambda folder, clock: StateStore(str(folder / "state.db"), clock=clock),
    "postgresql": lambda folder, clock: postgres.store_on(folder, clock),
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=sorted(BACKENDS))
def reopen(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Callable[[], Store]:
    """A new store object on the same data, as another worker (or a restarted server) opens it."""
    return lambda: BACKENDS[request.param](tmp_path, clock)


@pytest.fixture
def store(reopen: Callable[[], Store]) -> Iterator[Store]:
    store = reopen()
    store.initialize()
    yield store
    store.close()


def incoming(chat: str = wp.CUSTOMER_PN, *, ts: float | None = 100.0, body: str = "Oi", session: str = "default",
             bare: str | None = None) -> IncomingMessage:
    envelope = wp.text_message("WEBJS", sender=chat, body=body, session=session, message_id=bare)
    envelope["payload"]["timestamp"] = ts
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage)
    return message


def claim(store: Store, owner: str = "w1", lease: float = 30.0, **options: Any) -> ClaimedMessage | None:
    """The next due message, as the dispatcher takes it (a batch of one)."""
    batch = store.claim_due(owner, limit=1, lease_seconds=lease, **options)
    return batch[0] if batch else None


def taken_over(store: Store, clock: Clock, *, stale: str = "stale-host", live: str = "live-host",
               sent_first: bool = False) -> tuple[IncomingMessage, ClaimedMessage, ClaimedMessage]:
    """A message `stale` claimed (and, with `sent_first`, began sending as "x") and then lost: its 30 s lease
    ran out and `live` took it over."""
    message = incoming()
    store.accept(message)
    first = claim(store, stale, lease=30)
    if sent_first:
        assert store.begin_send(message.dedupe_key, stale, parts=["x"], reply=("x", Outcome.SUCCESS)) == "send"
    clock.now += 31
    current = claim(store, live)
    assert first is not None and current is not None
    return message, first, current


# --- the inbox ---------------------------------------------------------------------------------------

def test_a_message_is_recorded_once_and_survives_a_new_connection(store, reopen) -> None:
    message = incoming(body="Qual o preço?")
    assert store.accept(message) == Acceptance(stored=True, status="queued", attempts=0)
    assert store.accept(message) == Acceptance(stored=False, status="queued", attempts=0)
    reopened = reopen()
    claimed = claim(reopened)
    assert claimed.message == message and claimed.attempts == 1 and claimed.previous_status == "queued"
    assert reopened.snapshot().counters["messages_received"] == 1


def test_messages_of_one_chat_are_claimed_one_at_a_time_in_send_order(store) -> None:
    later, earlier, other_chat = incoming(ts=200, body="2"), incoming(ts=100, body="1"), incoming(wp.OTHER_PN, ts=300)
    for message in (later, earlier, other_chat):  # arrival order differs from send order
        store.accept(message)
    first = claim(store)
    assert first.message.text == "1"
    assert claim(store).message.chat_id == wp.OTHER_PN  # another chat does not wait
    assert claim(store) is None  # "2" waits while "1" is in progress
    store.finish(first.message.dedupe_key, first.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    assert claim(store).message.text == "2"


def test_same_second_messages_keep_arrival_order(store) -> None:
    for body in ("a", "b", "c"):
        store.accept(incoming(ts=100, body=body))
    order = []
    while (claimed := claim(store)) is not None:
        order.append(claimed.message.text)
        store.finish(claimed.message.dedupe_key, claimed.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    assert order == ["a", "b", "c"]


def test_an_abandoned_lease_is_taken_over_after_it_expires(store, clock) -> None:
    store.accept(incoming())
    dead = claim(store, "dead-worker", lease=30)
    assert claim(store, "w2") is None
    clock.now += 31
    taken = claim(store, "w2")
    assert taken.message == dead.message and taken.attempts == 2
    assert store.renew_leases([dead.message.dedupe_key], "dead-worker", lease_seconds=30) == 0
    assert store.begin_send(dead.message.dedupe_key, "dead-worker", parts=["x"]) == "lost"


def test_one_renewal_keeps_every_lease_of_a_worker_alive_and_no_one_elses(store, clock) -> None:
    for chat in ("5511900000001@c.us", "5511900000002@c.us", "5511900000003@c.us"):
        store.accept(incoming(chat))
    mine = [claim(store, "w1"), claim(store, "w1")]
    theirs = claim(store, "w2")
    clock.now += 20
    keys = [c.message.dedupe_key for c in (*mine, theirs)]
    assert store.renew_leases(keys, "w1", lease_seconds=30) == 2  # only the two w1 holds
    clock.now += 20  # 40 s after the claims: past the first lease, within the renewed one
    taken = claim(store, "w3")  # w2 never renewed: its message goes to the next worker
    assert taken.message == theirs.message and taken.attempts == 2
    assert claim(store, "w3") is None  # w1's two messages are still w1's
    assert store.renew_leases([], "w1", lease_seconds=30) == 0


def test_a_message_interrupted_while_sending_is_reclaimed_as_sending(store, clock) -> None:
    store.accept(incoming())
    first = claim(store, "w1")
    assert store.begin_send(first.message.dedupe_key, "w1", parts=["Olá!"], reply=("Olá!", Outcome.SUCCESS)) == "send"
    clock.now += 31
    again = claim(store, "w2")
    assert (again.previous_status, again.reply_text, again.outcome) == ("sending", "Olá!", "success")
    assert again.send_started_at == clock.now - 31


def test_sending_yields_to_an_earlier_message_that_arrived_late(store) -> None:
    second = incoming(ts=200, body="2")
    store.accept(second)
    claimed = claim(store)
    store.accept(incoming(ts=100, body="1"))  # delivered later, sent earlier
    assert store.begin_send(second.dedupe_key, claimed.lease_owner, parts=["2"]) == "yield"
    assert claim(store).message.text == "1"
    assert store.entry(second.dedupe_key).attempts == 0  # a yield is not a failed attempt


def test_failed_attempts_are_retried_later_then_given_up_and_counted(store, clock) -> None:
    message = incoming()
    store.accept(message)
    for attempt in (1, 2):
        claimed = claim(store)
        assert claimed.attempts == attempt
        assert store.record_failure(message.dedupe_key, claimed.lease_owner, "HTTP 500", max_attempts=3,
                                    retry_in=10) == "retry"
        assert claim(store) is None  # not due yet
        clock.now += 10
    claimed = claim(store)
    assert store.record_failure(message.dedupe_key, claimed.lease_owner, "HTTP 500", max_attempts=3,
                                retry_in=10) == "failed"
    entry = store.entry(message.dedupe_key)
    assert (entry.status, entry.last_error) == ("failed", "HTTP 500")
    counters = store.snapshot().counters
    assert counters["messages_failed"] == 1 and counters["messages_undelivered"] == 1
    assert store.accept(message).stored is False


def test_a_redelivery_after_a_failed_send_makes_the_message_due_at_once(store) -> None:
    message = incoming()
    store.accept(message)
    claimed = claim(store)
    store.record_failure(message.dedupe_key, claimed.lease_owner, "HTTP 500", max_attempts=5, retry_in=600)
    assert claim(store) is None
    assert store.accept(message) == Acceptance(stored=True, status="queued", attempts=0)
    assert claim(store).attempts == 1  # WAHA's redelivery is WAHA's retry: it does not use up ours


def test_waha_redeliveries_cannot_send_one_message_more_than_max_sends_times(store) -> None:
    message = incoming(body="Quero cancelar")
    store.accept(message)
    verdicts = []
    for _ in range(6):  # WAHA redelivers every 503: each makes the failed reply due at once again
        claimed = claim(store)
        if claimed is None:
            break
        verdict = store.begin_send(message.dedupe_key, claimed.lease_owner, parts=["Ok"],
                                   reply=("Ok", Outcome.SUCCESS), max_sends=3)
        verdicts.append(str(verdict))
        if verdict == "send":
            store.record_failure(message.dedupe_key, claimed.lease_owner, "HTTP 500", max_attempts=5, retry_in=600)
        store.accept(message)
    assert verdicts == ["send", "send", "send", "spent"]
    entry = store.entry(message.dedupe_key)
    assert entry.status == "failed" and "REPLY_MAX_SENDS" in entry.last_error
    assert store.snapshot().counters["messages_undelivered"] == 1
    assert store.accept(message).stored is False  # and later redeliveries are duplicates


def test_a_reply_found_already_sent_after_a_takeover_finishes_even_at_max_sends(store, clock) -> None:
    message = incoming(body="Qual o endereço?")
    store.accept(message)
    claimed = claim(store)
    assert store.begin_send(message.dedupe_key, claimed.lease_owner, parts=["Rua A, 1"],
                            reply=("Rua A, 1", Outcome.SUCCESS), max_sends=1) == "send"
    # The worker dies after WAHA took the text; the next one finds it in the chat: nothing is left to send.
    clock.now += 31  # its lease (30 s) runs out
    taken = claim(store, "w2")
    assert taken.previous_status == "sending"
    assert store.begin_send(message.dedupe_key, taken.lease_owner, parts=[], max_sends=1) == "send"
    store.finish(message.dedupe_key, taken.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="x")
    assert store.entry(message.dedupe_key).status == "done"
    assert store.snapshot().counters.get("messages_undelivered", 0) == 0


def test_release_hands_a_message_back_untried(store) -> None:
    message = incoming()
    store.accept(message)
    claimed = claim(store)
    store.release(message.dedupe_key, claimed.lease_owner)
    again = claim(store, "w2")
    assert again.attempts == 1 and again.previous_status == "queued"


def test_restart_recovery_makes_every_unfinished_message_due(store) -> None:
    for chat in (wp.CUSTOMER_PN, wp.OTHER_PN):
        store.accept(incoming(chat))
        claim(store, "old-run", lease=3600)
    assert claim(store, "new-run") is None
    assert store.expire_leases() == 2
    assert claim(store, "new-run") is not None and claim(store, "new-run") is not None


def test_restart_recovery_on_a_shared_database_takes_only_leases_that_ran_out(store, clock) -> None:
    # Several hosts on one database: a host starting must not take a live host's replies away from it.
    dead, live = incoming(wp.CUSTOMER_PN), incoming(wp.OTHER_PN)
    store.accept(dead)
    claim(store, "dead-host", lease=30)
    clock.now += 20
    store.accept(live)
    claim(store, "live-host", lease=30)
    clock.now += 11  # the dead host's lease ran out, the live host's did not
    assert store.expire_leases(only_run_out=True) == 1
    taken = claim(store, "new-host")
    assert taken.message == dead and claim(store, "new-host") is None
    assert store.renew_leases([live.dedupe_key], "live-host", lease_seconds=30) == 1
    assert store.begin_send(live.dedupe_key, "live-host", parts=["x"], reply=("x", Outcome.SUCCESS)) == "send"


def test_a_worker_whose_lease_was_taken_over_cannot_finish_the_message_it_did_not_send(store, clock) -> None:
    # Fencing: the first owner came back (a host paused, a partition) after another took its message over.
    message, stale, current = taken_over(store, clock)
    assert current.attempts == 2
    store.finish(message.dedupe_key, stale.lease_owner, outcome=Outcome.SKIPPED, sent_message_id=None)
    assert store.entry(message.dedupe_key).status == "processing"
    store.record_failure(message.dedupe_key, stale.lease_owner, "late", max_attempts=1, retry_in=0)
    store.release(message.dedupe_key, stale.lease_owner)
    assert store.entry(message.dedupe_key).status == "processing"
    assert store.begin_send(message.dedupe_key, stale.lease_owner, parts=["x"], reply=("x", Outcome.SUCCESS)) == "lost"
    assert store.begin_send(message.dedupe_key, "live-host", parts=["y"], reply=("y", Outcome.SUCCESS)) == "send"
    store.finish(message.dedupe_key, "live-host", outcome=Outcome.SUCCESS, sent_message_id="true_y",
                 history=(Turn(role="user", content="Oi"), Turn(role="assistant", content="y")))
    entry = store.entry(message.dedupe_key)
    assert (entry.status, entry.outcome, entry.sent_message_id) == ("done", "success", "true_y")
    assert store.snapshot().counters.get("messages_skipped", 0) == 0


def test_a_finish_adds_its_counts_only_when_it_finishes_and_says_whether_it_did(store, clock) -> None:
    """The per-session counts ride on finish (one write per message, not two) and cannot count a message twice;
    its answer tells the pipeline whether to count /metrics too."""
    message, stale, _ = taken_over(store, clock)
    counts = {"session.default.success": 1, "session.default.llm_cost_nanousd": 2500, "session.default.empty": 0}
    assert not store.finish(message.dedupe_key, stale.lease_owner, outcome=Outcome.SKIPPED, sent_message_id=None,
                            counts=counts)
    assert "session.default.success" not in store.snapshot().counters  # lost the lease: the finish did nothing
    assert store.finish(message.dedupe_key, "live-host", outcome=Outcome.SUCCESS, sent_message_id="true_y",
                        counts=counts)
    assert not store.finish(message.dedupe_key, "live-host", outcome=Outcome.SUCCESS, sent_message_id="true_y",
                            counts=counts)  # already done
    counters = store.snapshot().counters
    assert (counters["session.default.success"], counters["session.default.llm_cost_nanousd"]) == (1, 2500)
    assert "session.default.empty" not in counters


def test_what_writing_a_reply_cost_is_counted_whether_or_not_it_is_sent(store, clock) -> None:
    """/stats' llm_cost_usd: money spent on the LLM is spent, even when the reply then may not go out."""
    message, stale, _ = taken_over(store, clock)
    assert store.begin_send(message.dedupe_key, stale.lease_owner, parts=["x"], reply=("x", Outcome.SUCCESS),
                            llm_cost_usd=0.0000015) == "lost"
    assert store.begin_send(message.dedupe_key, "live-host", parts=["y"], reply=("y", Outcome.SUCCESS),
                            llm_cost_usd=0.000002) == "send"
    assert store.snapshot().counters[LLM_COST_COUNTER] == 1500 + 2000  # billionths of a dollar


def test_a_reply_waha_took_is_recorded_even_after_the_lease_was_taken_over(store, clock) -> None:
    # The other side of fencing: the text left, so saying so stops the new owner from sending a second copy.
    message, stale, current = taken_over(store, clock, sent_first=True)
    assert current.previous_status == "sending"
    store.finish(message.dedupe_key, stale.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="true_x",
                 last_part_id="true_x")
    assert store.entry(message.dedupe_key).status == "done"
    assert not store.mark_part_sent(message.dedupe_key, "live-host", parts_sent=1, sent_message_id=None)


def test_a_reply_waha_took_is_recorded_after_the_new_owner_failed_to_send_it_and_put_it_back(store, clock) -> None:
    # Host B sent; host A took the message over, its own sendText failed and put the message back in the
    # queue with the reply kept. B's word that WAHA took the text must still count: the retry (previous
    # status 'queued') would not ask WAHA first, and would send a second copy.
    message, stale, current = taken_over(store, clock, stale="host-b", live="host-a", sent_first=True)
    assert current.previous_status == "sending"
    store.record_failure(message.dedupe_key, "host-a", "sendText: timeout", max_attempts=10, retry_in=0)
    assert store.entry(message.dedupe_key).status == "queued"
    store.finish(message.dedupe_key, stale.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="true_x",
                 last_part_id="true_x")
    entry = store.entry(message.dedupe_key)
    assert (entry.status, entry.sent_message_id) == ("done", "true_x")
    assert claim(store, "host-a") is None  # no retry, no second copy


def test_a_reply_not_yet_written_cannot_be_finished_by_a_worker_that_lost_the_lease(store, clock) -> None:
    message, stale, _ = taken_over(store, clock, stale="host-b", live="host-a")
    store.record_failure(message.dedupe_key, "host-a", "llm: timeout", max_attempts=10, retry_in=0)
    store.finish(message.dedupe_key, stale.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="true_x")
    assert store.entry(message.dedupe_key).status == "queued"  # no reply began sending: B's word does not count


def test_finished_messages_are_pruned_but_counters_and_open_messages_stay(store, clock) -> None:
    done, still_open = incoming(wp.CUSTOMER_PN), incoming(wp.OTHER_PN)
    store.accept(done)
    claimed = claim(store)
    store.finish(done.dedupe_key, claimed.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="x")
    store.accept(still_open)
    clock.now += 3600
    assert store.prune(older_than=clock.now - 60, history_older_than=clock.now - 60) == 1
    assert store.entry(done.dedupe_key) is None and store.entry(still_open.dedupe_key).status == "queued"
    assert store.snapshot().counters["messages_processed"] == 1


def test_stats_add_up(store) -> None:
    a, b, c = incoming(wp.CUSTOMER_PN), incoming(wp.OTHER_PN), incoming(wp.CUSTOMER_LID)
    for message in (a, b, c):
        store.accept(message)
    first = claim(store)
    store.finish(first.message.dedupe_key, first.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    second = claim(store)
    store.finish(second.message.dedupe_key, second.lease_owner, outcome=Outcome.FALLBACK, sent_message_id=None)
    snapshot = store.snapshot()
    counters, in_progress = snapshot.counters, sum(snapshot.by_status.values())
    assert counters["messages_received"] == counters["messages_processed"] + counters["messages_failed"] + in_progress


def test_deliveries_recorded_by_many_threads_at_once_are_each_kept_and_counted_once(store, clock) -> None:
    """WAHA delivers concurrently (and message + message.any of one message): every key is recorded once,
    reported new to exactly one of its deliveries, and counted once."""
    messages = [incoming(chat=f"5511988{n % 40:06d}@c.us", bare=f"3EB0{n:08X}", body=f"pedido {n}") for n in range(160)]
    deliveries = messages + messages[::4]  # a quarter delivered twice
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def deliver(share: list[IncomingMessage]) -> None:
        for message in share:
            accepted = store.accept(message)
            with lock:
                results.append((message.dedupe_key, accepted.stored))

    threads = [threading.Thread(target=deliver, args=(deliveries[n::16],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == len(deliveries)
    stored = [key for key, new in results if new]
    assert sorted(stored) == sorted(m.dedupe_key for m in messages)  # each key new to one delivery only
    snapshot = store.snapshot()
    assert snapshot.counters["messages_received"] == len(messages) and snapshot.by_status["queued"] == len(messages)


def text_only(message: IncomingMessage) -> bool:
    return message.text is not None and message.text != "/reset"


def claim_after_burst(store: Store, clock: Clock,
                      messages: list[IncomingMessage]) -> ClaimedMessage | None:
    """The messages arrive together, the chat goes quiet, and a worker claims (debounce 3 s)."""
    for message in messages:
        store.accept(message)
    clock.now += 10
    return claim(store, debounce_seconds=3, mergeable=text_only)


def test_a_burst_is_claimed_once_the_chat_is_quiet_and_finishes_together(store, clock) -> None:
    burst = [incoming(ts=100 + n, body=text) for n, text in enumerate(["oi", "tudo bem?", "preço?"])]
    for message in burst:
        store.accept(message)
        clock.now += 1
    assert claim(store, debounce_seconds=3, mergeable=text_only) is None  # still typing
    clock.now += 3
    claimed = claim(store, debounce_seconds=3, mergeable=text_only)
    assert claimed.texts == ["oi", "tudo bem?", "preço?"]
    assert [store.entry(m.dedupe_key).status for m in burst] == ["processing", "merged", "merged"]
    store.finish(burst[0].dedupe_key, "w1", outcome=Outcome.SUCCESS, sent_message_id="true_x_ABC")
    entries = [store.entry(m.dedupe_key) for m in burst]
    assert [(e.status, e.outcome) for e in entries] == [("done", "success"), ("done", "merged"), ("done", "merged")]
    assert entries[2].sent_message_id == "true_x_ABC"  # a merged message reports the reply it got
    assert store.snapshot().counters["messages_processed"] == 3


def test_a_burst_that_never_pauses_is_answered_after_four_debounce_periods(store, clock) -> None:
    store.accept(incoming(ts=100, body="primeira"))
    for n in range(12):
        clock.now += 1
        store.accept(incoming(ts=101 + n, body=f"mais {n}"))
        if (claimed := claim(store, debounce_seconds=3, mergeable=text_only)):
            break
    assert claimed is not None and n == 11 and claimed.texts[0] == "primeira"


def test_commands_and_already_tried_messages_are_never_merged(store, clock) -> None:
    first, command, after = incoming(ts=100, body="oi"), incoming(ts=101, body="/reset"), incoming(ts=102, body="x")
    claimed = claim_after_burst(store, clock, [first, command, after])
    assert claimed.texts == ["oi"] and store.entry(command.dedupe_key).status == "queued"


def test_a_yield_hands_the_merged_messages_back_too(store, clock) -> None:
    later = [incoming(ts=200 + n, body=f"b{n}") for n in range(2)]
    claimed = claim_after_burst(store, clock, later)
    store.accept(incoming(ts=100, body="a"))  # sent before them, delivered after
    assert store.begin_send(later[0].dedupe_key, claimed.lease_owner, parts=["r"]) == "yield"
    assert [store.entry(m.dedupe_key).status for m in later] == ["queued", "queued"]


def test_a_reply_that_finally_fails_fails_its_merged_messages_too(store, clock) -> None:
    burst = [incoming(ts=100 + n, body=f"m{n}") for n in range(3)]
    claimed = claim_after_burst(store, clock, burst)
    assert store.record_failure(burst[0].dedupe_key, claimed.lease_owner, "HTTP 401", max_attempts=1,
                                retry_in=10) == "failed"
    assert {store.entry(m.dedupe_key).status for m in burst} == {"failed"}
    counters = store.snapshot().counters
    assert counters["messages_failed"] == counters["messages_undelivered"] == 3


def test_once_sending_began_a_reply_is_never_yielded_and_a_lost_lease_stops_the_parts(store, clock) -> None:
    second = incoming(ts=200, body="2")
    store.accept(second)
    claimed = claim(store, "w1")
    assert store.begin_send(second.dedupe_key, "w1", parts=["parte 1", "parte 2"],
                            reply=("parte 1\n\nparte 2", Outcome.SUCCESS)) == "send"
    assert store.mark_part_sent(second.dedupe_key, "w1", parts_sent=1, sent_message_id="true_x_P1")
    store.accept(incoming(ts=100, body="1"))  # too late to go first: part 1 already reached the customer
    assert store.begin_send(second.dedupe_key, "w1", parts=["parte 2"]) == "send"
    clock.now += 31
    taken = claim(store, "w2")
    assert (taken.previous_status, taken.parts_sent, taken.reply_text) == ("sending", 1, "parte 1\n\nparte 2")
    assert not store.mark_part_sent(second.dedupe_key, "w1", parts_sent=2, sent_message_id=None)
    assert claimed.attempts == 1


def test_a_batch_claim_takes_at_most_one_message_per_chat_and_never_one_twice(store) -> None:
    for n in range(3):
        store.accept(incoming(wp.CUSTOMER_PN, ts=100 + n, body=f"a{n}"))
        store.accept(incoming(wp.OTHER_PN, ts=100 + n, body=f"b{n}"))
    batch = store.claim_due("w1", limit=10, lease_seconds=30)
    assert sorted(c.message.text for c in batch) == ["a0", "b0"]
    assert store.claim_due("w2", limit=10, lease_seconds=30) == []


# --- conversations and chats ---------------------------------------------------------------------------

LIMITS = ChatLimits(per_minute=3, per_day=5, loop_repeats=4, loop_window=120, loop_pause=3600)
CHAT = f"default:{wp.CUSTOMER_PN}"


def answered(store: Store, message: IncomingMessage, reply: str) -> None:
    """The message gets `reply` through the whole send path, remembered in history."""
    store.accept(message)
    claimed = claim(store)
    assert claimed is not None and claimed.message == message
    assert store.begin_send(message.dedupe_key, "w1", parts=[reply], reply=(reply, Outcome.SUCCESS)) is \
        SendVerdict.SEND
    sent_id = f"true_{message.chat_id}_R1"
    store.finish(message.dedupe_key, "w1", outcome=Outcome.SUCCESS, sent_message_id=sent_id, last_part_id=sent_id,
                 history=(Turn(role="user", content=message.text or ""), Turn(role="assistant", content=reply)))


def test_history_keeps_the_latest_turns_of_a_chat_oldest_first_and_can_be_cleared(store, clock) -> None:
    answered(store, incoming(body="qual o horário?", ts=100), "das 8h às 18h")
    clock.now += 10
    answered(store, incoming(body="e no sábado?", ts=200), "até as 12h")
    turns = store.history(CHAT, since=clock.now - 3600, limit=3)
    assert [(t.role, t.content) for t in turns] == [
        ("assistant", "das 8h às 18h"), ("user", "e no sábado?"), ("assistant", "até as 12h")]
    assert store.history(CHAT, since=clock.now + 1, limit=10) == []  # past its time to live
    assert store.history(f"default:{wp.OTHER_PN}", since=0, limit=10) == []
    store.clear_history(CHAT)
    assert store.history(CHAT, since=0, limit=10) == []


def test_the_later_pause_wins_and_resuming_always_wins(store, clock) -> None:
    forever = 1e12
    store.pause_chat(CHAT, until=forever, reason="operator")  # /bot off
    store.pause_chat(CHAT, until=clock.now + 3600, reason="handoff")  # a person answers: must not shorten it
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.PAUSED
    assert store.snapshot().paused == {"operator": 1}
    store.pause_chat(CHAT, until=0, reason="operator")  # /bot on
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.OK
    store.pause_chat(CHAT, until=clock.now + 60, reason="handoff")
    store.pause_chat(CHAT, until=clock.now + 3600, reason="handoff")
    clock.now += 61
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.PAUSED  # the later one stands


def test_a_pause_that_begins_before_the_send_keeps_the_reply_unsent(store) -> None:
    message = incoming()
    store.accept(message)
    claimed = claim(store)
    store.pause_chat(CHAT, until=1e12, reason="operator")
    assert store.begin_send(message.dedupe_key, claimed.lease_owner, parts=["r"]) is SendVerdict.PAUSED


def test_opting_out_and_back_in(store) -> None:
    assert store.set_opted_out(CHAT, True) is False  # not paused: the confirmation may go out
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.OPTED_OUT
    assert store.snapshot().opted_out == 1
    store.set_opted_out(CHAT, False)
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.OK
    store.pause_chat(CHAT, until=1e12, reason="operator")
    assert store.set_opted_out(CHAT, True) is True  # paused: a person handles the chat, no confirmation


def test_limits_per_minute_and_per_day_with_one_notice_an_hour(store, clock) -> None:
    verdicts = [store.admit(CHAT, texts=[f"m{n}"], limits=LIMITS) for n in range(4)]
    assert [a.verdict for a in verdicts] == [Verdict.OK] * 3 + [Verdict.RATE_LIMITED]
    assert verdicts[3].notice is True
    assert store.admit(CHAT, texts=["m4"], limits=LIMITS).notice is False  # told once
    clock.now += 61  # a new minute, but the day already has 5 replies counted
    day = store.admit(CHAT, texts=["m5"], limits=LIMITS)
    assert day.verdict is Verdict.DAILY_CAP and day.notice is False  # the notice waits an hour
    clock.now += 3600
    assert store.admit(CHAT, texts=["m6"], limits=LIMITS).notice is True
    assert store.admit(f"default:{wp.OTHER_PN}", texts=["oi"], limits=LIMITS).verdict is Verdict.OK  # per chat


def test_the_same_text_over_and_over_is_a_loop_and_pauses_the_chat(store, clock) -> None:
    for n in range(4):
        store.accept(incoming(body="PROMOÇÃO IMPERDÍVEL", ts=100 + n))
    assert store.admit(CHAT, texts=["PROMOÇÃO IMPERDÍVEL"], limits=LIMITS).verdict is Verdict.LOOP
    assert store.snapshot().paused == {"loop": 1}
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.PAUSED
    clock.now += 3601
    assert store.admit(CHAT, texts=["oi"], limits=LIMITS).verdict is Verdict.OK


def test_our_own_long_reply_echoed_back_is_a_loop_but_a_short_ok_is_not(store) -> None:
    long_reply = "Olá! Nosso horário de atendimento é de segunda a sexta, das 8h às 18h."
    answered(store, incoming(body="horário?"), long_reply)
    assert store.admit(CHAT, texts=["ok"], limits=LIMITS).verdict is Verdict.OK
    assert store.admit(CHAT, texts=[long_reply.upper()], limits=LIMITS).verdict is Verdict.LOOP


def admit_fresh(claimed: ClaimedMessage) -> AdmissionRequest:
    """What the dispatcher asks of a claim for a reply not written yet: its admission, an hour of turns."""
    return AdmissionRequest(texts=claimed.texts, limits=LIMITS, history_seconds=3600, history_turns=10)


def test_a_claim_decides_the_admission_asked_for_and_reads_the_history_of_an_admitted_chat(store, clock) -> None:
    answered(store, incoming(body="qual o horário?", ts=100), "das 8h às 18h")
    clock.now += 10
    store.accept(incoming(body="e no sábado?", ts=200))
    store.accept(incoming(chat=wp.OTHER_PN, body="oi", ts=201))
    store.pause_chat(f"default:{wp.OTHER_PN}", until=1e12, reason="operator")
    batch = {c.message.chat_key: c for c in store.claim_due("w1", limit=10, lease_seconds=30, admit=admit_fresh)}
    admitted, paused = batch[CHAT], batch[f"default:{wp.OTHER_PN}"]
    assert admitted.admission == Admission(verdict=Verdict.OK)
    assert [(t.role, t.content) for t in admitted.history] == [
        ("user", "qual o horário?"), ("assistant", "das 8h às 18h")]
    assert paused.admission == Admission(verdict=Verdict.PAUSED) and paused.history == ()


def test_a_batch_claim_decides_each_chat_on_its_own_texts_and_history(store, clock) -> None:
    chats = [wp.CUSTOMER_PN, wp.OTHER_PN, "5511900000003", "5511900000004"]
    long_reply = "Olá! Nosso horário de atendimento é de segunda a sexta, das 8h às 18h."
    for n, chat in enumerate(chats):
        answered(store, incoming(chat=chat, body=f"pergunta {n}", ts=100 + n),
                 long_reply if n == 1 else f"resposta {n}")
    clock.now += 10
    for n, chat in enumerate(chats):  # the second echoes our long reply back: a loop
        store.accept(incoming(chat=chat, body=long_reply if n == 1 else f"de novo {n}", ts=200 + n))
    skip = f"default:{chats[2]}"
    batch = store.claim_due("w1", limit=10, lease_seconds=30,
                            admit=lambda claimed: None if claimed.message.chat_key == skip else admit_fresh(claimed))
    decided = {c.message.chat_key.split(":")[1]: (c.admission and c.admission.verdict, c.history) for c in batch}
    assert decided == {
        chats[0]: (Verdict.OK, (Turn(role="user", content="pergunta 0"), Turn(role="assistant", content="resposta 0"))),
        chats[1]: (Verdict.LOOP, ()),
        chats[2]: (None, ()),
        chats[3]: (Verdict.OK, (Turn(role="user", content="pergunta 3"), Turn(role="assistant", content="resposta 3"))),
    }


def test_a_chat_can_be_forgotten_while_a_claim_decides_its_admission(store, reopen) -> None:
    """--forget-chat and a claim lock the chat's rows in opposite orders; neither may fail for it."""
    store.set_opted_out(CHAT, False)  # the chat has its state row, as every chat answered before has
    store.accept(incoming(body="oi"))
    cli = reopen()  # the command line, beside the running server
    deciding, reports = threading.Event(), []

    def slow(claimed: ClaimedMessage) -> AdmissionRequest:
        deciding.set()
        time.sleep(0.5)  # the claim holds the message's row meanwhile; the forget starts now
        return admit_fresh(claimed)

    forgetting = threading.Thread(target=lambda: deciding.wait(10) and reports.append(cli.forget_chat(CHAT)))
    forgetting.start()
    try:
        claimed = claim(store, admit=slow)
    finally:
        forgetting.join(30)
        cli.close()
    assert claimed.admission.verdict is Verdict.OK
    assert len(reports) == 1 and reports[0].dropped_open == 1  # it waited for the claim, then forgot it all
    assert store.export_chat(CHAT).messages == []


def test_a_claims_admission_counts_against_the_limits_and_a_claim_asking_none_counts_nothing(store) -> None:
    store.accept(incoming(body="m0", ts=100))
    store.accept(incoming(chat=wp.OTHER_PN, body="m0", ts=100))
    counted = claim(store, admit=lambda claimed: admit_fresh(claimed) if claimed.message.chat_key == CHAT else None)
    uncounted = claim(store)
    assert counted.admission.verdict is Verdict.OK and uncounted.admission is None and uncounted.history == ()
    # LIMITS allow 3 a minute: the claim used one of this chat's, none of the other's.
    assert [store.admit(CHAT, texts=[f"m{n}"], limits=LIMITS).verdict for n in (1, 2, 3)] == [
        Verdict.OK, Verdict.OK, Verdict.RATE_LIMITED]
    other = f"default:{wp.OTHER_PN}"
    assert [store.admit(other, texts=[f"m{n}"], limits=LIMITS).verdict for n in (1, 2, 3)] == [Verdict.OK] * 3


def test_a_claim_asks_for_the_admission_of_the_whole_burst_and_decides_it_on_all_of_its_texts(store, clock) -> None:
    asked: list[list[str]] = []

    def admit(claimed: ClaimedMessage) -> AdmissionRequest:
        asked.append(claimed.texts)
        return admit_fresh(claimed)

    long_reply = "Olá! Nosso horário de atendimento é de segunda a sexta, das 8h às 18h."
    answered(store, incoming(body="horário?", ts=100), long_reply)
    clock.now += 10
    # Another bot: a greeting, then our own long reply echoed back, typed together.
    store.accept(incoming(body="oi", ts=200))
    store.accept(incoming(body=long_reply, ts=201))
    clock.now += 10
    claimed = claim(store, debounce_seconds=3, mergeable=text_only, admit=admit)
    assert asked == [["oi", long_reply]] and claimed.admission == Admission(verdict=Verdict.LOOP)
    assert store.snapshot().paused == {"loop": 1}


def test_a_claim_that_fails_takes_nothing_and_decides_nothing(store) -> None:
    message = incoming(body="m0")
    store.accept(message)

    def broken(claimed: ClaimedMessage) -> AdmissionRequest:
        raise RuntimeError("a bug in the dispatcher's admit")

    with pytest.raises(RuntimeError):
        store.claim_due("w1", limit=1, lease_seconds=30, admit=broken)
    assert store.entry(message.dedupe_key).status == "queued"
    retried = claim(store, admit=admit_fresh)
    assert retried.attempts == 1 and retried.admission.verdict is Verdict.OK
    assert [store.admit(CHAT, texts=[f"m{n}"], limits=LIMITS).verdict for n in (1, 2, 3)] == [
        Verdict.OK, Verdict.OK, Verdict.RATE_LIMITED]


def test_our_messages_are_known_by_id_and_by_recent_words(store, clock) -> None:
    answered(store, incoming(body="oi"), "Olá, como posso ajudar?")
    sent_id = f"true_{wp.CUSTOMER_PN}_R1"
    assert store.is_our_message(CHAT, message_id=sent_id, text=None, within=600)
    assert store.known_sent_ids([sent_id, "true_x_OTHER"]) == {"R1"}
    assert store.is_our_message(CHAT, message_id=None, text="olá,  COMO posso ajudar?", within=600)
    clock.now += 601
    assert not store.is_our_message(CHAT, message_id=None, text="Olá, como posso ajudar?", within=600)
    assert not store.is_our_message(CHAT, message_id="true_x_UNKNOWN", text="outra coisa", within=600)


def test_counters_add_up_across_store_objects(store, reopen) -> None:
    store.count("ignored.event_not_handled")
    other_worker = reopen()
    other_worker.count("ignored.event_not_handled", 2)
    assert store.snapshot().counters["ignored.event_not_handled"] == 3


def test_a_batch_of_counters_is_added_in_one_call(store, reopen) -> None:
    store.count("requests_unauthorized")
    reopen().count_many({"requests_unauthorized": 40, "ignored.event_not_handled": 7, "requests_rejected": 0})
    counters = store.snapshot().counters
    assert (counters["requests_unauthorized"], counters["ignored.event_not_handled"]) == (41, 7)
    assert counters.get("requests_rejected", 0) == 0
    store.count_many({})  # nothing to add is no write and no error


# --- media bytes -------------------------------------------------------------------------------------

def test_media_bytes_are_kept_until_the_message_is_finished(store, clock) -> None:
    voice = bytes(range(256)) * 40  # not text: every byte value
    message = incoming(body="segue o áudio")
    store.accept(message)
    store.put_media(message.dedupe_key, mimetype="audio/ogg", data=voice)
    store.put_media(message.dedupe_key, mimetype="audio/ogg", data=b"a redelivery")  # the first copy stays
    blob = store.get_media(message.dedupe_key)
    assert blob is not None and blob.data == voice and blob.mimetype == "audio/ogg"
    assert store.snapshot().media_bytes == len(voice)
    claimed = claim(store)
    store.finish(message.dedupe_key, claimed.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    assert store.get_media(message.dedupe_key) is None and store.snapshot().media_bytes == 0


def test_media_of_a_message_that_is_gone_is_pruned(store, clock) -> None:
    store.put_media("default:ORPHAN", mimetype="image/jpeg", data=b"\xff\xd8\xff")
    kept = incoming()
    store.accept(kept)
    store.put_media(kept.dedupe_key, mimetype="image/jpeg", data=b"\xff\xd8\xff\xe0")
    store.prune(older_than=clock.now, history_older_than=clock.now)
    assert store.get_media("default:ORPHAN") is None and store.get_media(kept.dedupe_key) is not None


# --- the media queue ---------------------------------------------------------------------------------

def media_incoming(*, bare: str = "MEDIA1", event: str = "message", caption: str | None = None) -> IncomingMessage:
    envelope = wp.media_message("WEBJS", kind="audio", message_id=bare, event=event, caption=caption)
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage) and message.media_url
    return message


def test_a_message_with_a_file_is_queued_for_download_once_for_message_and_message_any(store, clock) -> None:
    store.accept(media_incoming(event="message"))
    store.accept(media_incoming(event="message.any"))  # the same WhatsApp message again
    store.accept(incoming(body="texto"))  # no file, no job
    (job,) = store.claim_media_jobs("w1", limit=10, lease_seconds=30)
    assert job.key == "default:MEDIA1" and job.url.endswith(".oga") and job.mimetype == "audio/ogg; codecs=opus"
    assert job.attempts == 1
    assert store.claim_media_jobs("w2", limit=10, lease_seconds=30) == []  # w1 holds it
    assert store.media_job(job.key).state is MediaJobState.FETCHING


@pytest.mark.parametrize("mimetype", ["video/mp4", "application/vnd.openxmlformats-officedocument.wordprocessingml"])
def test_a_file_the_bot_cannot_use_is_never_queued_for_download(store, clock, mimetype: str) -> None:
    envelope = wp.media_message("WEBJS", kind="document", mimetype=mimetype, filename="x.docx", message_id="VIDEO1")
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage) and message.media_url
    store.accept(message)
    assert store.claim_media_jobs("w1", limit=10, lease_seconds=30) == []
    assert store.media_job(message.dedupe_key) is None


def test_stored_bytes_are_the_messages_until_it_is_finished(store, clock) -> None:
    voice = bytes(range(256)) * 30
    message = media_incoming()
    store.accept(message)
    (job,) = store.claim_media_jobs("w1", limit=1, lease_seconds=30)
    assert store.store_media_job(job.key, "w1", mimetype=job.mimetype, data=voice, max_total_bytes=10**6)
    assert store.media_job(job.key) == MediaJobStatus(state=MediaJobState.STORED, attempts=1, size=len(voice))
    assert store.get_media(job.key).data == voice
    claimed = claim(store)
    store.finish(message.dedupe_key, claimed.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    assert store.get_media(job.key) is None and store.media_job(job.key) is None


def test_a_bursts_files_and_their_downloads_go_when_its_reply_is_out(store, clock) -> None:
    burst = [media_incoming(bare="VOICE1"), media_incoming(bare="VOICE2")]
    for message in burst:
        store.accept(message)
        store.put_media(message.dedupe_key, mimetype="audio/ogg", data=b"OggS" + message.dedupe_key.encode())
    clock.now += 10  # the chat went quiet
    claimed = claim(store, debounce_seconds=3, mergeable=lambda message: True)
    assert claimed.message.dedupe_key == "default:VOICE1"
    assert [m.dedupe_key for m in claimed.merged] == ["default:VOICE2"]
    assert store.finish("default:VOICE1", claimed.lease_owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    for message in burst:
        assert store.get_media(message.dedupe_key) is None and store.media_job(message.dedupe_key) is None
    assert store.snapshot().media_bytes == 0


def test_a_download_whose_worker_died_is_taken_over_when_its_lease_runs_out(reopen, store, clock) -> None:
    store.accept(media_incoming())
    (job,) = store.claim_media_jobs("dead", limit=1, lease_seconds=30)
    other = reopen()  # another worker (or the server after a restart)
    assert other.claim_media_jobs("w2", limit=1, lease_seconds=30) == []
    clock.now += 31
    (again,) = other.claim_media_jobs("w2", limit=1, lease_seconds=30)
    assert again.key == job.key and again.attempts == 2
    # the dead worker's late answer is not taken
    assert not store.store_media_job(job.key, "dead", mimetype="audio/ogg", data=b"late", max_total_bytes=10**6)
    assert other.store_media_job(job.key, "w2", mimetype="audio/ogg", data=b"OggS...", max_total_bytes=10**6)
    assert other.get_media(job.key).data == b"OggS..."
    other.close()


def test_a_failed_download_says_why_and_a_transient_one_is_tried_again_later(store, clock) -> None:
    store.accept(media_incoming(bare="GONE"))
    store.accept(media_incoming(bare="SLOW"))
    jobs = {j.key: j for j in store.claim_media_jobs("w1", limit=5, lease_seconds=30)}
    store.fail_media_job("default:GONE", "w1", reason="not_found")
    store.fail_media_job("default:SLOW", "w1", reason="timeout", retry_in=2.0)
    assert len(jobs) == 2
    assert store.media_job("default:GONE") == MediaJobStatus(state=MediaJobState.FAILED, reason="not_found", attempts=1)
    assert store.media_job("default:SLOW").state is MediaJobState.PENDING
    assert store.claim_media_jobs("w1", limit=5, lease_seconds=30) == []  # not due yet
    clock.now += 2.5
    assert [j.key for j in store.claim_media_jobs("w1", limit=5, lease_seconds=30)] == ["default:SLOW"]


def test_the_media_store_is_bounded(store, clock) -> None:
    for bare in ("A1", "A2"):
        store.accept(media_incoming(bare=bare))
    first, second = sorted(store.claim_media_jobs("w1", limit=5, lease_seconds=30), key=lambda j: j.key)
    assert store.store_media_job(first.key, "w1", mimetype="audio/ogg", data=b"x" * 600, max_total_bytes=1000)
    assert not store.store_media_job(second.key, "w1", mimetype="audio/ogg", data=b"y" * 600, max_total_bytes=1000)
    assert store.media_job(second.key) == MediaJobStatus(state=MediaJobState.FAILED, reason="store_full", attempts=1)
    assert store.get_media(second.key) is None and store.snapshot().media_bytes == 600


def test_media_jobs_of_finished_messages_are_pruned(store, clock) -> None:
    message = media_incoming()
    store.accept(message)
    claimed = claim(store)
    store.finish(message.dedupe_key, claimed.lease_owner, outcome=Outcome.MEDIA_UNAVAILABLE, sent_message_id=None)
    assert store.media_job(message.dedupe_key) is None
    assert store.claim_media_jobs("w1", limit=5, lease_seconds=30) == []


# --- health ------------------------------------------------------------------------------------------

def test_health_reports_keep_since_while_the_status_stays(store, clock) -> None:
    store.set_health("waha:default", CheckStatus.DEGRADED, "SCAN_QR_CODE")
    first = store.health_reports()["waha:default"]
    clock.now += 30
    store.set_health("waha:default", CheckStatus.DEGRADED, "STARTING")
    again = store.health_reports()["waha:default"]
    assert (again.since, again.reason) == (first.since, "STARTING")
    store.set_health("waha:default", CheckStatus.OK, "WORKING")
    assert store.health_reports()["waha:default"].since == clock.now
    for n in range(3):
        store.set_health(f"waha:s{n}", CheckStatus.OK, "WORKING", max_parts=2)
    assert sorted(name for name in store.health_reports() if name.startswith("waha:")) == ["waha:default", "waha:s0"]


def test_chat_state_is_pruned_once_nothing_is_active_but_opt_outs_and_pauses_stay(store, clock) -> None:
    quiet, opted_out, paused, busy = (f"default:55119000000{n:02d}@c.us" for n in range(4))
    for chat in (quiet, opted_out, paused, busy):
        store.admit(chat, texts=["oi"], limits=LIMITS)  # creates each chat's row
    store.set_opted_out(opted_out, True)
    store.pause_chat(paused, until=1e12, reason="operator")
    clock.now += 3 * 86_400
    store.admit(busy, texts=["oi"], limits=LIMITS)  # heard from within the retention
    assert store.snapshot().chats == 4
    store.prune(older_than=clock.now - 86_400, history_older_than=clock.now - 86_400)
    after = store.snapshot()
    assert (after.chats, after.opted_out, after.paused) == (3, 1, {"operator": 1})  # only the quiet one went
    # The quiet chat starts over (its old counts are gone); the busy one keeps today's count.
    quiet_again = [store.admit(quiet, texts=[f"m{n}"], limits=LIMITS).verdict for n in range(4)]
    assert quiet_again == [Verdict.OK] * 3 + [Verdict.RATE_LIMITED]
    busy_again = [store.admit(busy, texts=[f"m{n}"], limits=LIMITS).verdict for n in range(3)]
    assert busy_again == [Verdict.OK, Verdict.OK, Verdict.RATE_LIMITED]


def test_a_chat_mark_is_set_once_per_value_whoever_asks(reopen: Callable[[], Store], store: Store) -> None:
    # The out-of-hours notice: the first message of a closed period gets it, the rest of the period does not,
    # and the next closed period (a new value) gets it again; another worker sees the same mark.
    other = reopen()
    assert store.mark_once("chat-a", "closed_notice", "2026-12-02T08:00:00-03:00") is True
    assert other.mark_once("chat-a", "closed_notice", "2026-12-02T08:00:00-03:00") is False
    assert store.mark_once("chat-b", "closed_notice", "2026-12-02T08:00:00-03:00") is True
    assert store.mark_once("chat-a", "other_mark", "2026-12-02T08:00:00-03:00") is True
    assert other.mark_once("chat-a", "closed_notice", "2026-12-03T08:00:00-03:00") is True
    assert store.mark_once("chat-a", "closed_notice", "2026-12-03T08:00:00-03:00") is False
    other.close()


def test_counters_are_read_back_by_name_as_every_worker_added_them(reopen: Callable[[], Store], store: Store) -> None:
    other = reopen()
    store.count_many({"llm_spend.2026-12-01.loja2": 1500, "session.loja2.messages_processed": 1})
    other.count_many({"llm_spend.2026-12-01.loja2": 2500})
    other.count("session.loja2.messages_processed")
    assert store.read_counters(["llm_spend.2026-12-01.loja2", "session.loja2.messages_processed", "never"]) == {
        "llm_spend.2026-12-01.loja2": 4000, "session.loja2.messages_processed": 2, "never": 0}
    assert other.read_counters([]) == {}
    other.close()


def test_a_chats_data_is_exported_whole_and_forgetting_it_leaves_only_keys_that_keep_answers_exactly_once(
        store: Store, clock: Clock) -> None:
    ana, other = wp.CUSTOMER_PN, wp.OTHER_PN
    first = incoming(ana, body="Meu CPF é 123.456.789-00", bare="3EB0ANA1")
    answered(store, first, "Anotado, Ana!")
    store.put_media(first.dedupe_key, mimetype="audio/ogg", data=b"OggS voz da Ana")
    store.mark_once(first.chat_key, "out_of_hours_notice", "2026-12-02T08:00:00-03:00")
    store.set_opted_out(first.chat_key, True)
    waiting = incoming(ana, ts=200.0, body="Ainda está aí?", bare="3EB0ANA2")
    store.accept(waiting)
    voice = media_incoming(bare="3EB0ANA3")  # a voice note whose file is still to be downloaded from WAHA
    assert voice.chat_key == first.chat_key
    store.accept(voice)
    answered(store, incoming(other, body="Sou o Bruno", bare="3EB0BRU1"), "Oi, Bruno!")

    exported = store.export_chat(first.chat_key)
    assert [m["message"]["text"] for m in exported.messages][:2] == ["Meu CPF é 123.456.789-00", "Ainda está aí?"]
    assert [(d["key"], d["state"]) for d in exported.downloads] == [(voice.dedupe_key, "pending")]
    assert exported.messages[0]["outcome"] == "success" and exported.messages[1]["status"] == "queued"
    assert [(t["role"], t["content"]) for t in exported.history] == [
        ("user", "Meu CPF é 123.456.789-00"), ("assistant", "Anotado, Ana!")]
    assert exported.chat_state is not None and exported.chat_state["opted_out"] is True
    assert exported.marks == {"out_of_hours_notice": "2026-12-02T08:00:00-03:00"}
    assert [(m["mimetype"], m["size"]) for m in exported.media] == [("audio/ogg", len(b"OggS voz da Ana"))]
    assert "R1" in [s["sent_message_id"] for s in exported.sent]
    assert "Bruno" not in exported.to_json()

    report = store.forget_chat(first.chat_key)
    assert report.deleted == {"chat_state": 1, "media": 1, "media_jobs": 1, "history": 2, "chat_marks": 1,
                              "sent": len(exported.sent), "inbox": 2}
    assert (report.kept_keys, report.dropped_open) == (1, 2)
    assert store.media_job(voice.dedupe_key) is None
    assert store.export_chat(first.chat_key).empty
    assert store.get_media(first.dedupe_key) is None
    assert store.history(first.chat_key, since=0, limit=10) == []
    # The answered message's key stays: WAHA redelivering it gets "duplicate", not a second answer.
    assert store.accept(first).stored is False
    assert store.entry(first.dedupe_key) is not None and store.entry(first.dedupe_key).outcome is Outcome.SUCCESS
    # Nothing personal is left anywhere: no number, no text, no reply.
    left = store.export_chat("forgotten").to_json()
    assert [secret for secret in ("123.456.789-00", "Anotado", ana, ana.split("@")[0]) if secret in left] == [], left
    # Another chat is untouched, and the forgotten chat starts afresh.
    assert store.export_chat(f"default:{other}").history[0]["content"] == "Sou o Bruno"
    assert store.mark_once(first.chat_key, "out_of_hours_notice", "2026-12-02T08:00:00-03:00") is True
    assert store.forget_chat("default:nobody@c.us").deleted == dict.fromkeys(report.deleted, 0)


def test_chat_marks_are_pruned_once_no_closed_period_can_still_need_them(store: Store, clock: Clock) -> None:
    assert store.mark_once("chat-a", "out_of_hours_notice", "2026-12-28T08:00:00-03:00") is True
    clock.now += 20 * 86_400  # a long holiday: the same closed period still knows its notice went out
    store.prune(older_than=clock.now - 3600, history_older_than=clock.now - 3600)
    assert store.mark_once("chat-a", "out_of_hours_notice", "2026-12-28T08:00:00-03:00") is False
    clock.now += 40 * 86_400
    store.prune(older_than=clock.now - 3600, history_older_than=clock.now - 3600)
    assert store.mark_once("chat-a", "out_of_hours_notice", "2026-12-28T08:00:00-03:00") is True
