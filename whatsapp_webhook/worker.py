"""Per-worker runtime: the dispatcher that claims due messages for the event loop, and what it owns per process."""

from __future__ import annotations

import asyncio
import os
import queue
import time
from collections.abc import (
    Awaitable,
    Callable,
)
from typing import TYPE_CHECKING

import httpx

from whatsapp_webhook import SERVICE_NAME
from whatsapp_webhook.concurrency import BackgroundLoop, CompletionBoard
from whatsapp_webhook.llm import LLMClient
from whatsapp_webhook.logs import MessageLog, log
from whatsapp_webhook.media_fetch import MEDIA_FETCHES_IN_FLIGHT, MediaFetcher, ModelInputKinds
from whatsapp_webhook.media_reply import MediaTurns
from whatsapp_webhook.metrics import REPLIES_IN_FLIGHT
from whatsapp_webhook.pipeline import ReplyPipeline
from whatsapp_webhook.store_api import InboxStatus, StoreUnavailable
from whatsapp_webhook.upstream import WAHA_MAX_CONNECTIONS, upstream_client
from whatsapp_webhook.waha import WahaClient

if TYPE_CHECKING:
    from whatsapp_webhook.events import IncomingMessage
    from whatsapp_webhook.health import HealthReporter
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import AdmissionRequest, ClaimedMessage, Store


CLAIM_BATCH = 32  # due messages taken per inbox transaction
POLL_SECONDS = 1.0  # how often every worker looks for due messages it was not woken for (a dead worker's)
WINDOW_SLACK_SECONDS = 0.005  # the window is measured on the wall clock at accept, the wake-up on the loop's


class Dispatcher:
    """Runs on the worker's event loop: claims due messages, keeps their leases alive, recovers abandoned ones.

    Any worker may finish any message: the one that received it is woken at once,
    and every worker also polls, which is how messages of a killed worker (lease ran
    out) or of a stopped server are finished.
    """

    def __init__(
        self,
        *,
        store: Store,
        pipeline: ReplyPipeline,
        settings: Settings,
        poll_seconds: float | None = None,
        prune_every_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.clock = clock  # wall time, as the store's timestamps are
        self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self.prune_every_seconds = prune_every_seconds
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self._tasks: dict[asyncio.Task[None], str] = {}  # reply in progress -> its message's key
        self._wake = asyncio.Event()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._leases: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[str], None]] = []

    def start(self) -> None:
        """Call on the loop."""
        loop = asyncio.get_running_loop()
        self._main = loop.create_task(self._run(), name="dispatcher")
        self._leases = loop.create_task(self._keep_leases(), name="leases")

    def wake(self) -> None:
        """Call on the loop."""
        self._wake.set()

    def message_arrived(self) -> None:
        """Call on the loop when a new message was recorded: claim now, and again when its debounce window ends.

        Without the second wake-up a lone message waited for the next poll, up to poll_seconds after its
        window (bench run 5b measured 260 ms after a 1.5 s window).
        """
        self._wake.set()
        if self.settings.debounce_seconds > 0:
            asyncio.get_running_loop().call_later(self.settings.debounce_seconds + WINDOW_SLACK_SECONDS, self._wake.set)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(key)` is called (on the loop) whenever an attempt on a message ends."""
        self._listeners.append(listener)

    async def _run(self) -> None:
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim_due()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + self.prune_every_seconds
                    await self._prune()
            except StoreUnavailable as exc:
                log.error("dispatcher cannot read the inbox: %s", exc)
            except Exception:
                log.exception("dispatcher loop error")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass

    async def _claim_due(self) -> None:
        """Claim while the batches come back full and there is room, starting each batch's replies at once.

        Up to store.claims_in_a_row claims follow each other on one store thread, not on the loop: under a
        burst the loop is late (its thread waits for the GIL and a core), and a claim that waited for the loop
        between batches left the inbox full meanwhile. Each batch is handed to the loop as soon as it is claimed.
        """
        loop = asyncio.get_running_loop()
        claimed_batches: queue.SimpleQueue[list[ClaimedMessage]] = queue.SimpleQueue()

        def start_claimed() -> None:  # on the loop
            while True:
                try:
                    batch = claimed_batches.get_nowait()
                except queue.Empty:
                    return
                for claimed in batch:
                    self._start(claimed)

        def claim_in_a_row(room: int) -> bool:  # on a store thread; True when the last batch came back full
            for _ in range(max(1, self.store.claims_in_a_row)):
                limit = min(room, CLAIM_BATCH)
                batch = self._claim(limit)
                claimed_batches.put(batch)
                loop.call_soon_threadsafe(start_claimed)
                room -= len(batch)
                if len(batch) < limit:
                    return False
                if room <= 0 or self._stopping:
                    break
            return True

        try:
            while not self._stopping and (room := self.settings.max_replies_in_flight - len(self._tasks)) > 0:
                if not await asyncio.to_thread(claim_in_a_row, room):
                    return
                start_claimed()  # before the room is counted again
        finally:
            start_claimed()  # whatever was claimed is started, even if a later claim failed

    def _claim(self, limit: int) -> list[ClaimedMessage]:
        """On a store thread: the claim, with the admissions the pipeline asks for decided in its transaction."""
        admission = self.pipeline.admission
        admission.prepare()  # a changed SESSIONS_FILE is (mostly) read here, not inside the claim's write lock

        def admit(claimed: ClaimedMessage) -> AdmissionRequest | None:
            # A bug here must not fail the whole claim, again at every poll (no chat would be answered): this
            # message is admitted when its reply is composed instead, where a failure is its own.
            try:
                return admission.request(claimed)
            except Exception:
                MessageLog(event=claimed.message.event_id, chat=claimed.message.chat_id).exception(
                    "could not tell the claim what to admit; admitted when the reply is composed"
                )
                return None

        return self.store.claim_due(
            self.owner,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            debounce_seconds=self.settings.debounce_seconds,
            mergeable=self._mergeable,
            admit=admit,
        )

    def _start(self, claimed: ClaimedMessage) -> None:
        if claimed.attempts > 1 or claimed.previous_status is InboxStatus.SENDING:
            MessageLog(event=claimed.message.event_id, chat=claimed.message.chat_id).info(
                "decision=%(decision)s attempt=%(attempt)d previous=%(previous)s",
                {"decision": "retry", "attempt": claimed.attempts, "previous": str(claimed.previous_status)},
            )
        task = asyncio.get_running_loop().create_task(self._process(claimed))
        self._tasks[task] = claimed.message.dedupe_key

    async def _process(self, claimed: ClaimedMessage) -> None:
        key = claimed.message.dedupe_key
        REPLIES_IN_FLIGHT.inc()
        try:
            await self.pipeline.process(claimed)
        except Exception:
            pass  # logged by the pipeline; the message is back in the inbox
        finally:
            REPLIES_IN_FLIGHT.dec()
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            for listener in self._listeners:
                listener(key)
            self._wake.set()  # the chat's next message may be due now

    async def _keep_leases(self) -> None:
        """Every third of LEASE_SECONDS, one write extends the leases of all replies in progress here."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            keys = list(self._tasks.values())
            try:
                await asyncio.to_thread(
                    self.store.renew_leases, keys, self.owner, lease_seconds=self.settings.lease_seconds
                )
            except StoreUnavailable as exc:
                log.warning("could not renew the leases of %d replies in progress: %s", len(keys), exc)
            except Exception:  # this task keeps every reply of the worker its own: it must not end
                log.exception("could not renew the leases of %d replies in progress", len(keys))

    def _mergeable(self, message: IncomingMessage) -> bool:
        """Text and media that may share one reply with the messages around it; commands stand alone."""
        understood = message.text is not None or (message.has_media and self.settings.media_enabled)
        return understood and self.settings.command_of(message.text) is None

    async def _prune(self) -> None:
        now = self.clock()
        removed = await asyncio.to_thread(
            self.store.prune,
            older_than=now - self.settings.state_retention_hours * 3600,
            history_older_than=now - self.settings.history_ttl_minutes * 60,
        )
        if removed:
            log.info("pruned %d finished messages older than %.0f h", removed, self.settings.state_retention_hours)

    async def stop(self, *, timeout: float) -> None:
        """Finish in-flight replies for up to `timeout` seconds; hand the rest back to the inbox."""
        self._stopping = True
        self._wake.set()
        try:
            if self._main is not None:
                await self._main
            pending = set(self._tasks)
            if pending:
                log.info("shutdown: waiting up to %.0fs for %d replies in flight", timeout, len(pending))
                _, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("shutdown: %d unfinished replies handed back to the inbox", len(pending))
        finally:
            if self._leases is not None:  # kept renewing while the replies above drained
                self._leases.cancel()
                await asyncio.gather(self._leases, return_exceptions=True)


class WorkerRuntime:
    """Everything that must exist once per worker process and never cross a fork."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        health: HealthReporter,
        llm_transport: httpx.AsyncBaseTransport | None = None,
        waha_transport: httpx.AsyncBaseTransport | None = None,
        media_transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.pid = os.getpid()
        self.background = BackgroundLoop()
        # One LLM connection per reply in flight: the LLM call is where replies spend their time.
        self.llm_http = upstream_client(
            transport=llm_transport,
            max_connections=settings.max_replies_in_flight,
            timeout=httpx.Timeout(
                connect=5.0,
                read=settings.llm_attempt_timeout_seconds,
                write=10.0,
                pool=settings.llm_attempt_timeout_seconds,
            ),
        )
        self.waha_http = upstream_client(
            transport=waha_transport,
            max_connections=WAHA_MAX_CONNECTIONS,
            timeout=httpx.Timeout(
                connect=5.0, read=settings.waha_timeout_seconds, write=10.0, pool=settings.waha_timeout_seconds
            ),
        )
        llm = LLMClient(
            http=self.llm_http,
            base_url=settings.openrouter_base_url,
            api_key=settings.openrouter_api_key,
            model=settings.openrouter_model,
            fallback_models=settings.openrouter_fallback_models,
            openrouter=settings.uses_openrouter,
            reasoning_effort=settings.llm_reasoning_effort,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
            attempt_timeout=settings.llm_attempt_timeout_seconds,
            deadline=settings.llm_deadline_seconds,
            max_attempts=settings.llm_max_attempts,
            app_title=SERVICE_NAME if settings.uses_openrouter else None,
            sleep=sleep,
        )
        waha = WahaClient(
            http=self.waha_http,
            base_url=settings.waha_base_url,
            api_key=settings.waha_api_key,
            send_attempts=settings.waha_send_attempts,
            sleep=sleep,
        )
        # Files have their own connections and queue: a reply backlog never makes WAHA's file expire first.
        self.media_http = upstream_client(
            transport=media_transport or waha_transport,
            max_connections=MEDIA_FETCHES_IN_FLIGHT,
            timeout=httpx.Timeout(settings.media_download_timeout_seconds, connect=5.0),
        )
        self.media_fetcher = MediaFetcher(store=store, http=self.media_http, settings=settings)
        input_kinds = ModelInputKinds(
            http=self.llm_http,
            base_url=settings.openrouter_base_url,
            api_key=settings.openrouter_api_key,
            model=settings.openrouter_model,
        )
        pipeline = ReplyPipeline(
            settings=settings,
            store=store,
            llm=llm,
            waha=waha,
            health=health,
            sleep=sleep,
            media=MediaTurns(store=store, settings=settings, input_kinds=input_kinds),
        )
        self.completions = CompletionBoard()
        self.dispatcher = Dispatcher(store=store, pipeline=pipeline, settings=settings)
        self.dispatcher.add_listener(self.completions.notify)
        self.background.call(self.dispatcher.start)
        if settings.media_enabled:
            self.background.call(self.media_fetcher.start)
            self.background.call(lambda: self._keep(asyncio.get_running_loop().create_task(input_kinds.announce())))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._announcing = task  # the loop holds tasks weakly

    def wake_dispatcher(self) -> None:
        """A new message was recorded (called from a request thread): one hop to the loop wakes both queues."""
        self.background.call(self._message_arrived)

    def _message_arrived(self) -> None:
        self.dispatcher.message_arrived()
        self.media_fetcher.wake()

    def close(self, *, drain_seconds: float = 10.0) -> None:
        async def stop() -> None:
            await self.dispatcher.stop(timeout=drain_seconds)
            await self.media_fetcher.stop()
            await self.media_http.aclose()
            await self.llm_http.aclose()
            await self.waha_http.aclose()

        try:
            self.background.submit(stop()).result(drain_seconds + 5)
        except Exception as exc:  # closing must never stop a worker from exiting
            log.warning("worker shutdown was not clean: %r", exc)
        self.background.stop()
