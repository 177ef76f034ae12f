"""The concurrency machinery: the cross-worker write gate with group commit (and Batcher, its PostgreSQL
counterpart), the completion board webhook threads wait on, and the worker's event-loop thread. (The upstream
connections are http11's.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import fcntl
import os
import sqlite3
import threading
from collections.abc import (
    Callable,
    Coroutine,
)
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from whatsapp_webhook.store_api import StoreUnavailable

T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(eq=False)
class QueuedWrite:
    """One write transaction's work, waiting at the WriterGate for a turn; filled in when committed."""

    work: Callable[[sqlite3.Connection], Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class WriterGate:
    """One writer at a time across threads (a lock) and gunicorn workers (flock on a side file),
    committing together the writes that queued up meanwhile (group commit).

    SQLite serialises writers too, but a blocked writer polls with sleeps of 1 to 100 ms; under
    load that idles the CPU while requests queue. Waiting here wakes the moment the writer is done.
    This lock is the one thing every worker shares, and under load dozens of writes wait for it,
    so whoever holds it commits all of them in one transaction: one BEGIN/COMMIT and one hand-off
    between processes instead of one each (bench/README.md, "Where the time went").
    """

    MAX_BATCH = 64  # bounds how long one turn holds the lock

    def __init__(self, path: str) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._pid: int | None = None
        self._turns = threading.Condition()  # guards the queue and whether a thread is writing
        self._queue: list[QueuedWrite] = []
        self._writing = False
        self._fd = -1

    def _for_this_process(self) -> None:
        if self._pid != os.getpid():
            with self._guard:  # first use in this process (never share a lock, queue or fd across fork)
                if self._pid != os.getpid():
                    self._turns = threading.Condition()
                    self._queue = []
                    self._writing = False
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    self._pid = os.getpid()

    def write(self, work: Callable[[sqlite3.Connection], T], commit: Callable[[list[QueuedWrite]], None]) -> T:
        """Queue `work` and wait until a writing thread (this one, if none is) has committed it.

        Returns what `work` returned, or raises what it raised (StoreUnavailable for the store itself).
        """
        self._for_this_process()
        queued = QueuedWrite(work)
        try:
            with self._turns:
                self._queue.append(queued)
                while self._writing and not queued.done:
                    self._turns.wait()
                leading = not queued.done
                self._writing = self._writing or leading
            if leading:
                try:
                    while not queued.done:
                        self._commit_next_batch(commit)
                finally:
                    with self._turns:
                        self._writing = False
                        self._turns.notify_all()  # the next waiting write leads
        except BaseException:
            with self._turns:  # the caller is gone (interrupted): a write nobody waits for must not happen later
                if queued in self._queue:
                    self._queue.remove(queued)
            raise
        if queued.error is not None:
            raise queued.error
        return cast(T, queued.result)  # committed without an error: result is what `work` returned

    def _commit_next_batch(self, commit: Callable[[list[QueuedWrite]], None]) -> None:
        batch: list[QueuedWrite] = []
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                # Taken only now: the writes that queued while the other workers held the lock go too.
                batch = self._take_batch()
                commit(batch)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            batch = batch or self._take_batch()
            for item in batch:
                if not item.done:
                    item.error = StoreUnavailable(f"state store lock error: {exc}")
        finally:
            with self._turns:
                for item in batch:  # nobody waits forever, whatever happened to this turn
                    if not item.done:
                        item.done = True
                        item.error = item.error or StoreUnavailable("state store write abandoned")
                self._turns.notify_all()  # their threads return now, not after the next turn

    def _take_batch(self) -> list[QueuedWrite]:
        with self._turns:
            batch = self._queue[: self.MAX_BATCH]
            del self._queue[: self.MAX_BATCH]
        return batch


@dataclass(eq=False)
class Submitted(Generic[ItemT]):
    """One item handed to a Batcher, waiting for the batch it goes out in; filled in when that batch is done."""

    item: ItemT
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Batcher(Generic[ItemT, ResultT]):
    """Items handed in by many threads go out together: a thread that finds no batch running leads, and runs
    `run(items)` for everything queued meanwhile; the others wait for theirs.

    `run` answers one result per item, in order; an exception in that list is raised to that item's thread
    alone (one bad item need not fail the others), and an exception `run` raises goes to every item of the
    batch (a copy each, with its cause). The group commit of WriterGate, for a database that takes concurrent
    writers (PostgreSQL): under load, one statement for dozens of deliveries instead of one each
    (bench/README.md, "Where the time went"); alone, an item goes out at once. One batch runs at a time per
    process.
    """

    def __init__(self, run: Callable[[list[ItemT]], list[ResultT | BaseException]], *, max_batch: int = 64) -> None:
        self._run = run
        self.max_batch = max_batch
        self._guard = threading.Lock()
        self._pid: int | None = None
        self._turns = threading.Condition()  # guards the queue and whether a batch is running
        self._queue: list[Submitted[ItemT]] = []
        self._running = False

    def _for_this_process(self) -> None:
        if self._pid != os.getpid():
            with self._guard:  # never share a lock or a queue across fork
                if self._pid != os.getpid():
                    self._turns = threading.Condition()
                    self._queue = []
                    self._running = False
                    self._pid = os.getpid()

    def submit(self, item: ItemT) -> ResultT:
        """Hand `item` in and wait for its result (or its batch's error, raised here)."""
        self._for_this_process()
        mine = Submitted(item)
        try:
            with self._turns:
                self._queue.append(mine)
                while self._running and not mine.done:
                    self._turns.wait()
                leading = not mine.done
                self._running = self._running or leading
            if leading:
                try:
                    while not mine.done:
                        self._run_next_batch()
                finally:
                    with self._turns:
                        self._running = False
                        self._turns.notify_all()  # the next waiting item leads
        except BaseException:
            with self._turns:  # the caller is gone (interrupted): an item nobody waits for must not go out later
                if mine in self._queue:
                    self._queue.remove(mine)
            raise
        if mine.error is not None:
            raise mine.error
        return cast(ResultT, mine.result)

    def _run_next_batch(self) -> None:
        with self._turns:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
        try:
            results = self._run([submitted.item for submitted in batch])
            for submitted, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    submitted.error = result
                else:
                    submitted.result = result
        except BaseException as exc:
            for submitted in batch:  # each its own copy: several threads raise them at once
                if isinstance(exc, Exception):
                    submitted.error = copy_of_error(exc)
                else:  # SystemExit, KeyboardInterrupt: the leader's to raise; its batch mates were not written
                    submitted.error = StoreUnavailable("state store write abandoned")
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._turns:
                for submitted in batch:
                    submitted.done = True
                self._turns.notify_all()  # their threads return now


def copy_of_error(exc: BaseException) -> BaseException:
    """A copy of `exc` to raise in another thread (its traceback would otherwise grow in both), cause kept."""
    try:
        clone = copy.copy(exc)
    except Exception:
        return exc
    clone.__cause__ = exc.__cause__
    return clone


class BackgroundLoop:
    """An asyncio loop in a daemon thread; Flask's threads hand it coroutines."""

    def __init__(self, *, name: str = "reply-loop") -> None:
        self.loop = asyncio.new_event_loop()
        # Store calls run in threads (asyncio.to_thread); the default pool (CPUs + 4) queues them under load.
        self.loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="store")
        )
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, callback: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def every(self, seconds: float, work: Callable[[], Any]) -> None:
        """Run the blocking `work` in the loop's thread pool `seconds` after the previous run ended, until the
        loop stops. `work` must not raise: nobody is there to see it.
        """

        def tick() -> None:
            done = self.loop.run_in_executor(None, work)
            done.add_done_callback(lambda _: self.loop.call_later(seconds, tick))

        self.loop.call_soon_threadsafe(self.loop.call_later, seconds, tick)

    def stop(self, *, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


class CompletionBoard:
    """Lets a webhook thread sleep until its message's attempt ends, instead of polling tightly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, tuple[threading.Event, int]] = {}

    def watch(self, key: str) -> threading.Event:
        with self._lock:
            event, watchers = self._events.get(key, (threading.Event(), 0))
            self._events[key] = (event, watchers + 1)
            return event

    def unwatch(self, key: str) -> None:
        with self._lock:
            event, watchers = self._events[key]
            if watchers <= 1:
                del self._events[key]
            else:
                self._events[key] = (event, watchers - 1)

    def notify(self, key: str) -> None:
        with self._lock:
            entry = self._events.get(key)
        if entry is not None:
            entry[0].set()
