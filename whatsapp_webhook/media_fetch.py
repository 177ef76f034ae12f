"""Getting customers' files: the streamed download from WAHA, the per-worker media queue runner, model input kinds.

MediaFetcher runs on each worker's event loop beside the Dispatcher, but on its own queue
(Store.claim_media_jobs): a file is downloaded within a second or so of its message being recorded,
whatever the debounce, rate limits or reply backlog hold up, because WAHA deletes it after
WHATSAPP_FILES_LIFETIME (180 s by default). A worker killed mid-download leaves a lease that runs out;
any worker then downloads the file again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx

from whatsapp_webhook.logs import log
from whatsapp_webhook.media import (
    MODALITY_OF_KIND,
    MediaKind,
    kind_of,
    matches_mimetype,
    media_source,
    media_summary,
)
from whatsapp_webhook.metrics import MEDIA_BYTES_DOWNLOADED
from whatsapp_webhook.store_api import MediaJobState, StoreUnavailable

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import MediaJob, Store


MEDIA_FETCHES_IN_FLIGHT = 4  # per worker: bounds the media bytes one worker holds at once
MEDIA_FETCH_ATTEMPTS = 3  # a timeout or a 5xx is tried again; a 404 or a refused origin is not
LEASE_SLACK_SECONDS = 15.0  # a download's lease outlives its timeout by this much; then another worker takes it
WAHA_FILE_LIFETIME_SECONDS = 180.0  # WHATSAPP_FILES_LIFETIME's default (waha.md §15): no file is had after it


def media_wait_seconds(download_timeout: float) -> float:
    """How long a reply waits for its file while the download is queued or running: every attempt timing
    out, the retries' backoff (1 s, 2 s), one lease running out after a worker's kill -9 and the queue's
    polling, but never as long as WAHA keeps the file (past that, waiting cannot help)."""
    backoff = sum(range(1, MEDIA_FETCH_ATTEMPTS))
    worst = MEDIA_FETCH_ATTEMPTS * (download_timeout + 1.0) + backoff + LEASE_SLACK_SECONDS
    return min(worst, WAHA_FILE_LIFETIME_SECONDS - 10.0)


CHUNK_BYTES = 64 * 1024


class MediaFailure(StrEnum):
    """Why a customer's file could not be had: the reason in the log, /metrics and media_jobs."""

    NOT_DOWNLOADED = "not_downloaded"  # hasMedia but media.url null: WAHA's config did not download it
    WAHA_ERROR = "waha_error"  # media.error: WAHA (or the phone) failed to download it
    BAD_URL = "bad_url"
    REFUSED_ORIGIN = "refused_origin"  # media.url outside WAHA_BASE_URL and MEDIA_ALLOWED_ORIGINS
    NOT_FOUND = "not_found"  # 404/410: the file's lifetime ran out
    HTTP_ERROR = "http_error"
    NETWORK = "network"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"  # over MEDIA_MAX_BYTES: reading stopped at the cap
    WRONG_TYPE = "wrong_type"  # the bytes are not what the mimetype says
    STORE_FULL = "store_full"  # MEDIA_STORE_MAX_BYTES reached
    LOST = "lost"  # no job and no bytes (e.g. recorded by a version without media support)
    UNSUPPORTED = "unsupported"  # a kind the bot or the model cannot take
    BUG = "bug"  # our own code failed: the log has the traceback


class MediaDownloadError(Exception):
    def __init__(self, reason: MediaFailure, detail: str, *, transient: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.transient = transient


async def download_media(
    http: httpx.AsyncClient,
    url: str,
    *,
    mimetype: str,
    settings: Settings,
) -> bytes:
    """The file at a media.url, read in chunks and never past MEDIA_MAX_BYTES, checked against its mimetype.

    Only WAHA's origin gets X-Api-Key; redirects are not followed (a redirect could lead anywhere).
    """
    source = media_source(url, waha_base_url=settings.waha_base_url, allowed_origins=settings.media_allowed_origins)
    if source.url is None:
        raise MediaDownloadError(MediaFailure.REFUSED_ORIGIN, "media.url is not on WAHA's origin nor an allowed one")
    headers = {"Accept-Encoding": "identity"}  # the cap counts the file's own bytes, never a decompressed stream
    if source.sends_api_key:
        headers["X-Api-Key"] = settings.waha_api_key
    cap = settings.media_max_bytes
    try:
        async with asyncio.timeout(settings.media_download_timeout_seconds):
            async with http.stream("GET", source.url, headers=headers, follow_redirects=False) as response:
                if response.status_code in (404, 410):
                    raise MediaDownloadError(MediaFailure.NOT_FOUND, f"HTTP {response.status_code}: the file is gone")
                if response.status_code != 200:
                    raise MediaDownloadError(
                        MediaFailure.HTTP_ERROR,
                        f"HTTP {response.status_code}",
                        transient=response.status_code >= 500 or response.status_code == 429,
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap:
                    raise MediaDownloadError(MediaFailure.TOO_LARGE, f"{declared} bytes declared, cap {cap}")
                body = bytearray()
                async for chunk in response.aiter_raw(CHUNK_BYTES):
                    body += chunk
                    if len(body) > cap:
                        raise MediaDownloadError(MediaFailure.TOO_LARGE, f"more than {cap} bytes (stopped reading)")
    except TimeoutError:
        raise MediaDownloadError(
            MediaFailure.TIMEOUT, f"no file within {settings.media_download_timeout_seconds:.0f}s", transient=True
        ) from None
    except httpx.TransportError as exc:
        raise MediaDownloadError(MediaFailure.NETWORK, type(exc).__name__, transient=True) from None
    data = bytes(body)
    if not matches_mimetype(data, mimetype):
        raise MediaDownloadError(MediaFailure.WRONG_TYPE, "the bytes do not match the declared mimetype")
    return data


class MediaFetcher:
    """Runs on the worker's event loop: claims files to download, downloads them, stores the bytes."""

    def __init__(
        self,
        *,
        store: Store,
        http: httpx.AsyncClient,
        settings: Settings,
        poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.http = http
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.owner = f"{os.uname().nodename}:{os.getpid()}:media:{os.urandom(3).hex()}"
        self.lease_seconds = settings.media_download_timeout_seconds + LEASE_SLACK_SECONDS
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Call on the loop."""
        self._main = asyncio.get_running_loop().create_task(self._run(), name="media-fetcher")

    def wake(self) -> None:
        """Call on the loop."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            room = MEDIA_FETCHES_IN_FLIGHT - len(self._tasks)
            if room > 0:
                try:
                    jobs = await asyncio.to_thread(
                        self.store.claim_media_jobs, self.owner, limit=room, lease_seconds=self.lease_seconds
                    )
                except StoreUnavailable as exc:
                    log.error("media queue cannot be read: %s", exc)
                    jobs = []
                except Exception:
                    log.exception("media queue error")
                    jobs = []
                for job in jobs:
                    task = asyncio.get_running_loop().create_task(self._fetch(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                if len(jobs) == room:
                    continue  # more may be waiting
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _fetch(self, job: MediaJob) -> None:
        try:
            data = await download_media(self.http, job.url, mimetype=job.mimetype, settings=self.settings)
        except MediaDownloadError as exc:
            again = exc.transient and job.attempts < MEDIA_FETCH_ATTEMPTS
            log.warning(
                "media download failed: reason=%s attempt=%d then=%s (%s)",
                str(exc.reason),
                job.attempts,
                "retry" if again else "unavailable",
                str(exc),
            )
            await self._quietly(
                self.store.fail_media_job,
                job.key,
                self.owner,
                reason=str(exc.reason),
                retry_in=float(job.attempts) if again else None,
            )
            return
        except Exception:
            again = job.attempts < MEDIA_FETCH_ATTEMPTS  # a bug that always fails must not be retried forever
            log.exception(
                "media download failed in our code: attempt=%d then=%s",
                job.attempts,
                "retry" if again else "unavailable",
            )
            await self._quietly(
                self.store.fail_media_job,
                job.key,
                self.owner,
                reason=str(MediaFailure.BUG),
                retry_in=5.0 if again else None,
            )
            return
        stored = await self._quietly(
            self.store.store_media_job,
            job.key,
            self.owner,
            mimetype=job.mimetype,
            data=data,
            max_total_bytes=self.settings.media_store_max_bytes,
        )
        if stored:
            MEDIA_BYTES_DOWNLOADED.inc(len(data))
            log.info("media stored: kind=%s bytes=%d", str(kind_of(job.mimetype)), len(data))
        else:
            status = await self._quietly(self.store.media_job, job.key)
            if status is not None and status.reason == MediaFailure.STORE_FULL:
                log.error("media not kept: MEDIA_STORE_MAX_BYTES (%d) reached", self.settings.media_store_max_bytes)

    async def _quietly(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except StoreUnavailable as exc:  # the lease runs out and the file is tried again
            log.error("media queue write failed: %s", exc)
            return None

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            await self._main
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# Files (raw bytes) the replies being written on one worker hold at once, before base64 and the request body
# (about 3.7x more while the LLM request is built). A file bigger than this is still taken, alone.
MEDIA_MEMORY_PER_WORKER_BYTES = 64 * 1024 * 1024


class MediaBudget:
    """At most `limit` bytes of customers' files held by the replies being written on this worker at once.

    A reply reserves its files' size before reading them from the store and frees it once its LLM request
    is done; the others wait. A single file over the limit is let through when nothing else is held.
    """

    def __init__(self, limit: int = MEDIA_MEMORY_PER_WORKER_BYTES) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def reserve(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.limit)
            self.held += size
            self.peak = max(self.peak, self.held)

    async def release(self, size: int) -> None:
        if size:
            async with self._changed:
                self.held -= size
                self._changed.notify_all()


@dataclass(frozen=True, kw_only=True)
class StoredMedia:
    """Whether a message's file is in the store (and how big), or why it will not be."""

    size: int = 0
    failure: MediaFailure | None = None


async def await_stored(
    store: Store,
    key: str,
    *,
    wait_seconds: float,
    poll_seconds: float = 0.2,
    sleep: Callable[[float], Any] = asyncio.sleep,
    clock: Callable[[], float] | None = None,
) -> StoredMedia:
    """Wait up to `wait_seconds` while the message's download is still queued or running (retries included)."""
    now = clock or asyncio.get_running_loop().time
    give_up_at = now() + wait_seconds
    while True:
        status = await asyncio.to_thread(store.media_job, key)
        if status is None:  # recorded before the media queue existed, or put_media'd directly
            blob = await asyncio.to_thread(store.get_media, key)
            return StoredMedia(size=len(blob.data)) if blob else StoredMedia(failure=MediaFailure.LOST)
        if status.state is MediaJobState.STORED:
            return StoredMedia(size=status.size)
        if status.state is MediaJobState.FAILED:
            reason = status.reason or ""
            return StoredMedia(failure=MediaFailure(reason) if reason in set(MediaFailure) else MediaFailure.HTTP_ERROR)
        if now() >= give_up_at:
            return StoredMedia(failure=MediaFailure.TIMEOUT)
        await sleep(poll_seconds)


def input_kinds_of(document: Any, model: str) -> frozenset[str] | None:
    """A GET /models answer's architecture.input_modalities for `model`; None when it does not say."""
    data = document.get("data") if isinstance(document, dict) else None
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            architecture = entry.get("architecture")
            kinds = architecture.get("input_modalities") if isinstance(architecture, dict) else None
            if isinstance(kinds, list):
                return frozenset(k for k in kinds if isinstance(k, str))
    return None


class ModelInputKinds:
    """Which media kinds the configured model takes, from GET /models, asked once per worker (then every hour).

    When the server does not say (no architecture, or not reachable), every kind is tried: the LLM's
    error then gives the customer FALLBACK_MESSAGE rather than the bot refusing what might work.
    """

    RECHECK_SECONDS = 3600.0

    def __init__(self, *, http: httpx.AsyncClient, base_url: str, api_key: str, model: str) -> None:
        self.http, self.base_url, self.model = http, base_url.rstrip("/"), model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._kinds: frozenset[str] | None = None
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def announce(self) -> None:
        """Say at start which media the model will understand (one GET /models, after the fork)."""
        log.info("media: %s", media_summary(await self._current(), model=self.model))

    async def understood(self, kind: MediaKind) -> bool:
        if kind is MediaKind.UNSUPPORTED:
            return False
        kinds = await self._current()
        return kinds is None or MODALITY_OF_KIND[kind] in kinds

    async def _current(self) -> frozenset[str] | None:
        now = asyncio.get_running_loop().time()
        async with self._lock:
            if self._checked_at is None or now - self._checked_at > self.RECHECK_SECONDS:
                self._checked_at = now
                try:
                    response = await self.http.get(f"{self.base_url}/models", headers=self.headers, timeout=10.0)
                    self._kinds = input_kinds_of(response.json(), self.model) if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("GET /models for the model's input kinds failed (%s): trying every kind", exc)
                    self._kinds = None
            return self._kinds
