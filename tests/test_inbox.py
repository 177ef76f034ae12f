"""The durable inbox: recorded once, claimed in chat order under leases, retried within bounds, recovered."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import threading
import time
from typing import Any

import pytest

from fakes import waha_payloads as wp
from tests.conftest import make_settings
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_schema import Acceptance, ClaimedMessage, StoreUnavailable
from whatsapp_webhook.worker import Dispatcher


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Any, clock: Clock) -> StateStore:
    store = StateStore(str(tmp_path / "state.db"), clock=clock)
    store.initialize()
    return store


def incoming(chat: str = wp.CUSTOMER_PN, *, ts: float | None = 100.0, body: str = "Oi", session: str = "default",
             bare: str | None = None) -> IncomingMessage:
    envelope = wp.text_message("WEBJS", sender=chat, body=body, session=session, message_id=bare)
    envelope["payload"]["timestamp"] = ts
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage)
    return message


def claim(store: StateStore, owner: str = "w1", lease: float = 30.0,
          **options: Any) -> ClaimedMessage | None:
    """The next due message, as the dispatcher takes it (a batch of one)."""
    batch = store.claim_due(owner, limit=1, lease_seconds=lease, **options)
    return batch[0] if batch else None


def test_a_message_is_recorded_once_and_survives_a_new_connection(store, tmp_path, clock) -> None:
    message = incoming(body="Qual o preço?")
    assert store.accept(message) == Acceptance(stored=True, status="queued", attempts=0)
    assert store.accept(message) == Acceptance(stored=False, status="queued", attempts=0)
    reopened = StateStore(str(tmp_path / "state.db"), clock=clock)
    claimed = claim(reopened)
    assert claimed.message == message and claimed.attempts == 1 and claimed.previous_status == "queued"
    assert reopened.snapshot()["counters"]["messages_received"] == 1


def test_messages_of_one_chat_are_claimed_one_at_a_time_in_send_order(store) -> None:
    later, earlier, other_chat = incoming(ts=200, body="2"), incoming(ts=100, body="1"), incoming(wp.OTHER_PN, ts=300)
    for message in (later, earlier, other_chat):  # arrival order differs from send order
        store.accept(message)
    first = claim(store)
    assert first.message.text == "1"
    assert claim(store).message.chat_id == wp.OTHER_PN  # another chat does not wait
    assert claim(store) is None  # "2" waits while "1" is in progress
    store.finish(first.message.dedupe_key, first.lease_owner, outcome="success", sent_message_id=None)
    assert claim(store).message.text == "2"


def test_same_second_messages_keep_arrival_order(store) -> None:
    for body in ("a", "b", "c"):
        store.accept(incoming(ts=100, body=body))
    order = []
    while (claimed := claim(store)) is not None:
        order.append(claimed.message.text)
        store.finish(claimed.message.dedupe_key, claimed.lease_owner, outcome="success", sent_message_id=None)
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
    assert store.begin_send(first.message.dedupe_key, "w1", parts=["Olá!"], reply=("Olá!", "success")) == "send"
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
    counters = store.snapshot()["counters"]
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


def test_finished_messages_are_pruned_but_counters_and_open_messages_stay(store, clock) -> None:
    done, still_open = incoming(wp.CUSTOMER_PN), incoming(wp.OTHER_PN)
    store.accept(done)
    claimed = claim(store)
    store.finish(done.dedupe_key, claimed.lease_owner, outcome="success", sent_message_id="x")
    store.accept(still_open)
    clock.now += 3600
    assert store.prune(older_than=clock.now - 60, history_older_than=clock.now - 60) == 1
    assert store.entry(done.dedupe_key) is None and store.entry(still_open.dedupe_key).status == "queued"
    assert store.snapshot()["counters"]["messages_processed"] == 1


def test_stats_add_up(store) -> None:
    a, b, c = incoming(wp.CUSTOMER_PN), incoming(wp.OTHER_PN), incoming(wp.CUSTOMER_LID)
    for message in (a, b, c):
        store.accept(message)
    first = claim(store)
    store.finish(first.message.dedupe_key, first.lease_owner, outcome="success", sent_message_id=None)
    second = claim(store)
    store.finish(second.message.dedupe_key, second.lease_owner, outcome="fallback", sent_message_id=None)
    snapshot = store.snapshot()
    counters, in_progress = snapshot["counters"], sum(snapshot["by_status"].values())
    assert counters["messages_received"] == counters["messages_processed"] + counters["messages_failed"] + in_progress


def _claim_all(path: str, owner: str, results: Any) -> None:
    store = StateStore(path)
    claimed = []
    while (item := claim(store, owner, lease=600)) is not None:
        claimed.append(item.message.dedupe_key)
    results.put(claimed)


def test_four_processes_never_claim_the_same_message(tmp_path) -> None:
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    store.initialize()
    for n in range(200):
        store.accept(incoming(f"55219{n:08d}@c.us", bare=f"3EB0{n:018X}"))
    results: Any = multiprocessing.get_context("fork").Queue()
    workers = [multiprocessing.get_context("fork").Process(target=_claim_all, args=(path, f"p{i}", results))
               for i in range(4)]
    for worker in workers:
        worker.start()
    claimed = [key for _ in workers for key in results.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=10)
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_an_unwritable_store_raises_store_unavailable(tmp_path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(str(path))
    store.initialize()
    if os.system(f"chattr +i {path} 2>/dev/null") != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(StoreUnavailable):
            StateStore(str(path)).accept(incoming())
    finally:
        os.system(f"chattr -i {path}")


# --- bursts merged into one reply, replies sent in parts ---------------------------------------------

def text_only(message: IncomingMessage) -> bool:
    return message.text is not None and message.text != "/reset"


def claim_after_burst(store: StateStore, clock: Clock,
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
    store.finish(burst[0].dedupe_key, "w1", outcome="success", sent_message_id="true_x_ABC")
    entries = [store.entry(m.dedupe_key) for m in burst]
    assert [(e.status, e.outcome) for e in entries] == [("done", "success"), ("done", "merged"), ("done", "merged")]
    assert entries[2].sent_message_id == "true_x_ABC"  # a merged message reports the reply it got
    assert store.snapshot()["counters"]["messages_processed"] == 3


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
    counters = store.snapshot()["counters"]
    assert counters["messages_failed"] == counters["messages_undelivered"] == 3


def test_once_sending_began_a_reply_is_never_yielded_and_a_lost_lease_stops_the_parts(store, clock) -> None:
    second = incoming(ts=200, body="2")
    store.accept(second)
    claimed = claim(store, "w1")
    assert store.begin_send(second.dedupe_key, "w1", parts=["parte 1", "parte 2"],
                            reply=("parte 1\n\nparte 2", "success")) == "send"
    assert store.mark_part_sent(second.dedupe_key, "w1", parts_sent=1, sent_message_id="true_x_P1")
    store.accept(incoming(ts=100, body="1"))  # too late to go first: part 1 already reached the customer
    assert store.begin_send(second.dedupe_key, "w1", parts=["parte 2"]) == "send"
    clock.now += 31
    taken = claim(store, "w2")
    assert (taken.previous_status, taken.parts_sent, taken.reply_text) == ("sending", 1, "parte 1\n\nparte 2")
    assert not store.mark_part_sent(second.dedupe_key, "w1", parts_sent=2, sent_message_id=None)
    assert claimed.attempts == 1


def test_writes_that_wait_for_another_worker_are_committed_together(store, tmp_path) -> None:
    """Group commit: what queued while the lock was elsewhere goes in one transaction; nothing is lost,
    and a write that fails (a bug, or SQLite refusing it) fails alone."""
    batches: list[int] = []
    commit = store._commit
    store._commit = lambda batch: (batches.append(len(batch)), commit(batch))[1]
    store.count("warm-up")  # opens this process's lock file
    errors: list[BaseException] = []

    def write(work) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    other_worker = os.open(str(tmp_path / "state.db.lock"), os.O_RDWR)
    fcntl.flock(other_worker, fcntl.LOCK_EX)  # another gunicorn worker is writing
    threads = [threading.Thread(target=write, args=(lambda: store.count("replies"),)) for _ in range(8)]
    threads.insert(3, threading.Thread(target=write, args=(lambda: store._transaction(lambda c: 1 / 0),)))
    refused = "INSERT INTO counters (name, value) VALUES ('x', NULL)"  # NOT NULL: SQLite refuses this one write
    threads.insert(6, threading.Thread(target=write, args=(lambda: store._transaction(lambda c: c.execute(refused)),)))
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # all ten are queued behind the other worker
    fcntl.flock(other_worker, fcntl.LOCK_UN)
    os.close(other_worker)
    for thread in threads:
        thread.join(10)
    assert sorted(type(e).__name__ for e in errors) == ["StoreUnavailable", "ZeroDivisionError"]
    assert store.snapshot()["counters"]["replies"] == 8
    assert max(batches) == 10  # one lock turn for all ten, not one each


def test_the_lease_keeper_survives_an_unexpected_error(tmp_path) -> None:
    """One task renews every lease of the worker: an error it does not expect must not end it."""
    class FlakyStore:
        calls = 0

        def claim_due(self, *args: Any, **kwargs: Any) -> list:
            return []

        def prune(self, **kwargs: Any) -> int:
            return 0

        def renew_leases(self, keys: Any, owner: str, *, lease_seconds: float) -> int:
            FlakyStore.calls += 1
            if FlakyStore.calls == 1:
                raise RuntimeError("unexpected")
            return 0

    async def scenario() -> None:
        dispatcher = Dispatcher(store=FlakyStore(), pipeline=None,  # type: ignore[arg-type]
                                       settings=make_settings(tmp_path, lease_seconds=0.03))
        dispatcher.start()
        await asyncio.sleep(0.2)
        await dispatcher.stop(timeout=1)

    asyncio.run(scenario())
    assert FlakyStore.calls >= 3  # kept renewing after the first call failed
