"""The concurrency machinery on its own: the write gate's group commit, the completion board, the loop thread.

(The sharded upstream pools have their own file, test_upstream_pools.py, with real loopback sockets.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import pytest

from whatsapp_webhook.concurrency import BackgroundLoop, CompletionBoard, QueuedWrite, WriterGate
from whatsapp_webhook.store_api import StoreUnavailable


def committer(log: list[list[Any]], *, hold: threading.Event | None = None):
    """A commit step like the store's: runs each queued work item and records which items shared a turn."""

    def commit(batch: list[QueuedWrite]) -> None:
        if hold is not None:
            hold.wait(5)
        log.append([item.work(None) for item in batch])
        for item in batch:
            item.result = log[-1][batch.index(item)]
            item.done = True

    return commit


def test_one_write_returns_what_its_work_returned(tmp_path) -> None:
    gate, turns = WriterGate(str(tmp_path / "gate.lock")), []
    assert gate.write(lambda connection: "written", committer(turns)) == "written"
    assert turns == [["written"]]


def test_writes_that_queue_behind_a_turn_are_committed_together_in_order(tmp_path) -> None:
    gate, turns, release = WriterGate(str(tmp_path / "gate.lock")), [], threading.Event()
    commit = committer(turns, hold=release)
    results: dict[int, Any] = {}
    first = threading.Thread(target=lambda: results.setdefault(0, gate.write(lambda c: 0, commit)))
    first.start()
    time.sleep(0.1)  # the first write holds the turn (waiting on `release`)
    waiting = [threading.Thread(target=lambda n=n: results.setdefault(n, gate.write(lambda c, n=n: n, commit)))
               for n in range(1, 11)]
    for thread in waiting:
        thread.start()
        time.sleep(0.01)  # queue them in a known order
    release.set()
    for thread in (first, *waiting):
        thread.join(5)
    assert results == {n: n for n in range(11)}
    assert turns == [[0], list(range(1, 11))]  # ten waiting writes, one turn


def test_a_failing_turn_fails_its_writes_and_the_gate_keeps_working(tmp_path) -> None:
    gate = WriterGate(str(tmp_path / "gate.lock"))

    def broken(batch: list[QueuedWrite]) -> None:
        raise OSError("disk gone")

    with pytest.raises(StoreUnavailable, match="lock error: disk gone"):
        gate.write(lambda c: 1, broken)
    assert gate.write(lambda c: 2, committer([])) == 2


def test_a_commit_that_leaves_a_write_undone_never_leaves_its_caller_waiting(tmp_path) -> None:
    gate = WriterGate(str(tmp_path / "gate.lock"))
    with pytest.raises(StoreUnavailable, match="abandoned"):
        gate.write(lambda c: 1, lambda batch: None)


def _hold_lock(path: str, held: Any, release: Any) -> None:
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    held.set()
    release.wait(10)
    fcntl.flock(fd, fcntl.LOCK_UN)


def test_the_gate_waits_for_another_process_holding_the_lock(tmp_path) -> None:
    path = str(tmp_path / "gate.lock")
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    other = context.Process(target=_hold_lock, args=(path, held, release))
    other.start()
    assert held.wait(10)
    gate, done = WriterGate(path), threading.Event()
    writer = threading.Thread(target=lambda: (gate.write(lambda c: 1, committer([])), done.set()))
    writer.start()
    assert not done.wait(0.3)  # the other worker holds the lock
    release.set()
    assert done.wait(10)
    other.join(10)


def test_the_completion_board_wakes_every_watcher_of_a_key_and_forgets_it_after() -> None:
    board = CompletionBoard()
    first, second = board.watch("k"), board.watch("k")
    assert first is second and not first.is_set()
    board.notify("other")
    assert not first.is_set()
    board.notify("k")
    assert first.is_set()
    board.unwatch("k")
    board.unwatch("k")
    assert not board.watch("k").is_set()  # a new watcher after everyone left starts fresh
    board.notify("nobody-watches")  # harmless


def test_the_background_loop_runs_coroutines_and_callbacks_from_other_threads() -> None:
    background = BackgroundLoop(name="test-loop")
    try:
        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        assert background.submit(where()).result(5) == "test-loop"
        called = threading.Event()
        background.call(called.set)
        assert called.wait(5)
    finally:
        background.stop()
    assert background.loop.is_closed() and not background.thread.is_alive()
    background.stop()  # stopping twice is harmless


def test_every_runs_blocking_work_in_the_pool_again_and_again_until_the_loop_stops() -> None:
    background = BackgroundLoop(name="test-loop")
    runs: list[str] = []
    three = threading.Event()

    def work() -> None:
        runs.append(threading.current_thread().name)
        if len(runs) == 3:
            three.set()

    try:
        background.every(0.01, work)
        assert three.wait(5)
    finally:
        background.stop()
    assert all(name.startswith("store") for name in runs)  # the loop's thread pool, never the loop itself
    stopped_at = len(runs)
    time.sleep(0.05)
    assert len(runs) <= stopped_at + 1  # at most one already handed to the pool when the loop stopped
