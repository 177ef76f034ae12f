"""The SQLite store's own behaviour: group commit at the write gate, several processes on one file,
upgrades of older state files. What every backend must do is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.test_store_contract import Clock, claim, incoming
from whatsapp_webhook.settings import SettingsError
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import StoreUnavailable
from whatsapp_webhook.store_schema import MIGRATIONS, SCHEMA_VERSION
from whatsapp_webhook.worker import Dispatcher


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Any, clock: Clock) -> StateStore:
    store = StateStore(str(tmp_path / "state.db"), clock=clock)
    store.initialize()
    return store















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
        except BaseException as exc:
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
    assert store.snapshot().counters["replies"] == 8
    assert max(batches) == 10  # one lock turn for all ten, not one each


def test_writes_from_many_threads_at_once_never_get_an_api_misuse_error(store) -> None:
    """A write whose work returned its cursor (count_many's executemany, clear_history's DELETE) handed that
    cursor, which belongs to the leading thread's connection, to the waiting thread; its clean-up there raced
    the leader's next statement and SQLite answered SQLITE_MISUSE ("bad parameter or other API misuse") to a
    random write: in the bench, a reply stuck until its lease ran out."""
    errors: list[str] = []
    stop = time.monotonic() + 3

    def writer(n: int) -> None:
        while time.monotonic() < stop:
            try:
                store.count_many({f"session.s{n}.success": 1, f"session.s{n}.llm_cost_nanousd": 7})
                store.clear_history(f"default:{n}@c.us")
            except StoreUnavailable as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_the_lease_keeper_survives_an_unexpected_error(tmp_path) -> None:
    """One task renews every lease of the worker: an error it does not expect must not end it."""
    class FlakyStore:
        calls = 0
        claims_in_a_row = 1

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


def test_the_dispatcher_keeps_claiming_full_batches_while_the_loop_is_busy(tmp_path) -> None:
    """Under a burst the loop is late: on a store that allows claims in a row (PostgreSQL), the next batch is claimed
    as soon as the last one came back full, not when the loop gets round to it, and each batch's replies start once
    the loop is free."""
    claims: list[int] = []
    seen_while_blocked: list[int] = []

    class FullInbox:
        claims_in_a_row = 8  # as on PostgreSQL

        def claim_due(self, owner: str, *, limit: int, **kwargs: Any) -> list:
            claims.append(limit)
            if len(claims) > 3:
                return []
            return [SimpleNamespace(attempts=1, previous_status="queued",
                                    message=SimpleNamespace(dedupe_key=f"k{len(claims)}-{n}", event_id="e",
                                                            chat_id="c"))
                    for n in range(limit)]

        def prune(self, **kwargs: Any) -> int:
            return 0

        def renew_leases(self, keys: Any, owner: str, *, lease_seconds: float) -> int:
            return 0

    class LoopHoggingPipeline:
        admission = SimpleNamespace(prepare=lambda: None, request=lambda claimed: None)

        def __init__(self) -> None:
            self.started: list[str] = []

        async def process(self, claimed: Any) -> None:
            if not self.started:
                time.sleep(0.5)  # the loop's thread is busy (blocked) for half a second
                seen_while_blocked.append(len(claims))
            self.started.append(claimed.message.dedupe_key)

    pipeline = LoopHoggingPipeline()

    async def scenario() -> None:
        dispatcher = Dispatcher(store=FullInbox(), pipeline=pipeline,  # type: ignore[arg-type]
                                settings=make_settings(tmp_path, max_replies_in_flight=200), poll_seconds=3600)
        dispatcher.start()
        await asyncio.sleep(0.8)
        await dispatcher.stop(timeout=1)

    asyncio.run(scenario())
    assert seen_while_blocked == [4]  # three full batches and the empty one, all while the loop was blocked
    assert len(pipeline.started) == 96 and len(set(pipeline.started)) == 96  # every claimed reply started once


# --- versioned schema: old state files upgrade in place -----------------------------------------------

DATA = Path(__file__).resolve().parent / "data"


def restore(dump: str, path: Path) -> None:
    """A state file as the older release left it (the dump is SQL: *.db files are git-ignored)."""
    connection = sqlite3.connect(path)
    connection.executescript((DATA / dump).read_text())
    connection.close()


@pytest.mark.parametrize("dump", ["state-1.0.sql", "state-1.1.sql"])
def test_a_state_file_of_an_older_release_upgrades_in_place_and_keeps_its_messages(dump, tmp_path) -> None:
    path = tmp_path / "state.db"
    restore(dump, path)
    before = sqlite3.connect(path).execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    store = StateStore(str(path), clock=lambda: 1_800_000_000.0)
    store.initialize()
    assert store.schema_version() == SCHEMA_VERSION
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == before
    snapshot = store.snapshot()
    assert snapshot.counters["messages_received"] == before and snapshot.counters["messages_processed"] == 1
    assert store.history("default:5511900000001@c.us", since=0, limit=10)[-1].content == "Das 8h às 18h."
    # What was unfinished is answered after the upgrade: restart recovery, then a claim.
    store.expire_leases()
    claimed = store.claim_due("new-worker", limit=10, lease_seconds=30)
    assert {c.message.text for c in claimed} >= {"Vocês entregam?"}
    store.put_media(claimed[0].message.dedupe_key, mimetype="image/jpeg", data=b"\xff\xd8")  # the new table
    store.initialize()  # again: nothing to do
    assert store.schema_version() == SCHEMA_VERSION


def test_a_state_file_of_a_newer_release_is_refused_with_what_to_do(tmp_path) -> None:
    path = tmp_path / "state.db"
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(SettingsError, match="written by a newer release"):
        StateStore(str(path)).initialize()


def test_a_new_state_file_starts_at_the_current_schema(tmp_path) -> None:
    store = StateStore(str(tmp_path / "new.db"))
    store.initialize()
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
