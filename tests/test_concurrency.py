"""The concurrency machinery on its own: the write gate's group commit, the Batcher, the completion board, the
loop thread, and gunicorn_worker's pieces (what its poller gathers, the reader that keeps the read deadline; the
worker as a whole runs under real gunicorn in tests/e2e/test_faults.py).

(The upstream transport has its own file, test_http11.py, with real loopback sockets.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
import time
from typing import Any

import pytest

from whatsapp_webhook.concurrency import (
    BackgroundLoop,
    Batcher,
    CompletionBoard,
    QueuedWrite,
    Submitted,
    WriterGate,
)
from whatsapp_webhook.gunicorn_worker import (
    GATHER_BODY_BYTES,
    HEAD_LIMIT_BYTES,
    DeadlineUnreader,
    ReadDeadlineWorker,
    RequestReadTimeout,
    body_to_gather,
)
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


class HeldBatches:
    """A batch step that records each batch and answers item * 10; the first batch waits for `release`."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        if not self.batches:
            self.entered.set()
            self.release.wait(5)
        self.batches.append(items)
        return [item * 10 for item in items]


def behind_a_held_batch(batcher: Batcher[int, int], step: HeldBatches, hand_in: Any, waiting: int) -> None:
    """`hand_in(0)` goes out first and is held; `hand_in(1..waiting)` are handed in meanwhile, a thread each;
    once they all wait, the first batch is let go and every thread finishes."""
    threads = [threading.Thread(target=hand_in, args=(n,)) for n in range(waiting + 1)]
    threads[0].start()
    assert step.entered.wait(5)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 5
    while len(batcher._queue) < waiting and time.monotonic() < deadline:  # all of them waiting
        time.sleep(0.005)
    step.release.set()
    for thread in threads:
        thread.join(5)


def submit_behind_a_running_batch(batcher: Batcher[int, int], step: HeldBatches, waiting: int) -> dict[int, int]:
    results: dict[int, int] = {}
    behind_a_held_batch(batcher, step, lambda n: results.setdefault(n, batcher.submit(n)), waiting)
    return results


def test_an_item_alone_goes_out_at_once_and_gets_its_result() -> None:
    step = HeldBatches()
    step.release.set()
    assert Batcher(step).submit(7) == 70
    assert step.batches == [[7]]


def test_items_handed_in_while_a_batch_runs_go_out_together_each_with_its_own_result() -> None:
    step = HeldBatches()
    results = submit_behind_a_running_batch(Batcher(step), step, 10)
    assert results == {n: n * 10 for n in range(11)}
    assert step.batches[0] == [0] and sorted(step.batches[1]) == list(range(1, 11))  # ten items, one batch


def test_a_batch_is_at_most_max_batch_items() -> None:
    step = HeldBatches()
    results = submit_behind_a_running_batch(Batcher(step, max_batch=4), step, 10)
    assert results == {n: n * 10 for n in range(11)}
    assert [len(batch) for batch in step.batches] == [1, 4, 4, 2]


def test_a_leader_whose_item_is_not_in_its_first_batch_goes_on_until_it_is() -> None:
    """Items queued ahead of the leader's own (their threads waiting) go first; the leader must not return
    before its own item went out."""
    step = HeldBatches()
    step.release.set()
    batcher: Batcher[int, int] = Batcher(step, max_batch=1)
    batcher._for_this_process()
    ahead = Submitted(99)
    batcher._queue.append(ahead)  # an item handed in just before, whose thread has not led yet
    assert batcher.submit(1) == 10
    assert step.batches == [[99], [1]] and ahead.done and ahead.result == 990


def test_an_item_the_batch_step_fails_alone_raises_in_its_own_thread_only() -> None:
    step = HeldBatches()

    def fails_odd_items(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"item {item} refused") if item % 2 else result for item, result in zip(items, step(items))]

    batcher: Batcher[int, int] = Batcher(fails_odd_items)
    results: dict[int, Any] = {}

    def hand_in(n: int) -> None:
        try:
            results[n] = batcher.submit(n)
        except ValueError as exc:
            results[n] = str(exc)

    behind_a_held_batch(batcher, step, hand_in, 6)
    assert results == {n: f"item {n} refused" if n % 2 else n * 10 for n in range(7)}
    assert len(step.batches) == 2  # the failures did not split the batch


def test_a_failed_batch_fails_each_of_its_items_and_the_next_one_goes_out() -> None:
    calls: list[list[int]] = []

    def step(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise StoreUnavailable("state store error: connection refused")
        return items

    batcher: Batcher[int, int] = Batcher(step)
    with pytest.raises(StoreUnavailable, match="connection refused"):
        batcher.submit(1)
    assert batcher.submit(2) == 2


def test_a_batch_stopped_by_a_base_exception_leaves_its_other_items_a_store_error() -> None:
    """SystemExit or KeyboardInterrupt in the leader stops that thread; the request threads of its batch mates
    answer as for any write that could not be made (503), as with WriterGate."""
    step = HeldBatches()

    def interrupted(items: list[int]) -> list[int]:
        step(items)
        if len(step.batches) == 2:
            raise SystemExit("worker stopping")
        return items

    batcher: Batcher[int, int] = Batcher(interrupted)
    raised: dict[int, str] = {}

    def hand_in(n: int) -> None:
        try:
            batcher.submit(n)
        except BaseException as exc:
            raised[n] = f"{type(exc).__name__}: {exc}"

    behind_a_held_batch(batcher, step, hand_in, 4)
    assert sorted(raised) == [1, 2, 3, 4]  # item 0 went out in the first batch
    assert sorted(raised.values()).count("SystemExit: worker stopping") == 1  # the leader of the second batch
    assert sorted(raised.values()).count("StoreUnavailable: state store write abandoned") == 3


def test_every_item_of_a_failed_batch_gets_its_own_copy_of_the_error_with_its_cause() -> None:
    step = HeldBatches()

    def outage(items: list[int]) -> list[int]:
        step(items)
        try:
            raise OSError("server closed the connection")
        except OSError as cause:
            raise StoreUnavailable("state store error: server closed the connection") from cause

    batcher: Batcher[int, int] = Batcher(outage)
    errors: dict[int, BaseException] = {}

    def hand_in(n: int) -> None:
        try:
            batcher.submit(n)
        except StoreUnavailable as exc:
            errors[n] = exc

    behind_a_held_batch(batcher, step, hand_in, 3)
    assert sorted(errors) == [0, 1, 2, 3]
    assert len({id(exc) for exc in errors.values()}) == 4  # one each: tracebacks never mix across threads
    assert all(isinstance(exc.__cause__, OSError) for exc in errors.values())


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


# --- gunicorn_worker ------------------------------------------------------------------------------

START = b"POST /api/v1/whatsapp/webhook HTTP/1.1\r\nHost: x"


@pytest.mark.parametrize("headers, gathered", [
    (b"Content-Length: 1234", 1234),
    (b"content-length:  0 ", 0),
    (b"", 0),  # no body
    (b"Content-Length: %d" % GATHER_BODY_BYTES, GATHER_BODY_BYTES),
    (b"Content-Length: %d" % (GATHER_BODY_BYTES + 1), 0),  # larger bodies are read by a thread
    (b"Transfer-Encoding: chunked", 0),
    (b"Content-Length: 10\r\nExpect: 100-continue", 0),  # the client waits for gunicorn's go-ahead
    (b"Content-Length: 10\r\nContent-Length: 10", 0),  # gunicorn's parser refuses these; not our call
    (b"Content-Length: -5", 0),
    (b"Content-Length: " + b"9" * 5000, 0),  # not even parsed as a number
])
def test_the_poller_gathers_a_small_body_announced_by_content_length_only(headers: bytes, gathered: int) -> None:
    assert body_to_gather(START + b"\r\n" + headers) == gathered


class Conn:
    """What DeadlineUnreader and _request_gathered use of a DeadlineConn."""

    def __init__(self, head: bytes = b"", deadline: float | None = None) -> None:
        self.head, self.deadline, self.timed_out = bytearray(head), deadline, False
        self.searched = self.need = 0

    def take_head(self) -> bytes:
        head, self.head = self.head, bytearray()
        return bytes(head)


def gathered_after(*pieces: bytes) -> list[bool]:
    conn = Conn()
    done = []
    for piece in pieces:
        conn.head += piece
        done.append(ReadDeadlineWorker._request_gathered(conn))
    return done


def test_a_request_is_gathered_once_its_headers_and_announced_body_are_in() -> None:
    assert gathered_after(START, b"\r\nContent-Length: 4\r", b"\n\r\n", b"{}", b"{}") == [False, False, False,
                                                                                          False, True]
    assert gathered_after(b"GET /health HTTP/1.1\r\n\r\n") == [True]
    assert gathered_after(START + b"\r\nTransfer-Encoding: chunked\r\n\r\n") == [True]  # the thread reads chunks
    assert gathered_after(b"x" * (HEAD_LIMIT_BYTES - 1), b"x") == [False, True]  # the parser refuses it


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_the_reader_hands_out_the_gathered_bytes_first_then_reads_the_socket(pair) -> None:
    ours, theirs = pair
    conn = Conn(head=b"gathered ", deadline=time.monotonic() + 5)
    reader = DeadlineUnreader(ours, conn)
    theirs.sendall(b"then the socket")
    assert reader.read() == b"gathered "
    assert reader.read() == b"then the socket"
    assert ours.gettimeout() is None  # the socket is left as it was found


def test_the_reader_never_waits_past_the_deadline(pair) -> None:
    ours, theirs = pair
    conn = Conn(deadline=time.monotonic() + 0.2)
    reader = DeadlineUnreader(ours, conn)
    theirs.sendall(b"a")
    assert reader.read() == b"a"
    with pytest.raises(RequestReadTimeout) as raised:
        reader.read()  # nothing more comes: the recv gives up at the deadline
    assert conn.timed_out and isinstance(raised.value, TimeoutError)
    with pytest.raises(RequestReadTimeout):
        reader.read()  # past it, no recv at all


def test_the_reader_keeps_a_shorter_timeout_of_gunicorns_own(pair) -> None:
    ours, _ = pair
    conn = Conn(deadline=time.monotonic() + 30)
    ours.settimeout(0.05)  # gunicorn's drain of an unread body bounds its reads too
    with pytest.raises(TimeoutError) as raised:
        DeadlineUnreader(ours, conn).read()
    assert not isinstance(raised.value, RequestReadTimeout) and not conn.timed_out
    assert ours.gettimeout() == 0.05
