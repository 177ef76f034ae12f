"""What the LLM and WAHA clients share: the error hierarchy, Retry-After, backoff and the per-worker HTTP client."""

from __future__ import annotations

import email.utils
import json
import time
import urllib.request
from collections.abc import (
    Callable,
    Mapping,
)
from datetime import UTC
from typing import Any

import httpx

from whatsapp_webhook.http11 import KeepAliveTransport


class UpstreamError(Exception):
    """A call to the LLM or to WAHA failed; `transient` says whether trying again can help."""

    service = "upstream"

    def __init__(
        self, message: str, *, status: int | None = None, transient: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.service}: {self.args[0]}{status}"


class LLMError(UpstreamError):
    service = "llm"


class EmptyReplyError(LLMError):
    """The LLM answered 200 without usable text; worth one quick retry, not many."""


class WahaError(UpstreamError):
    service = "waha"

    def __init__(self, message: str, *, maybe_delivered: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        # The request left but no answer came back: WAHA may have sent the text anyway.
        self.maybe_delivered = maybe_delivered


TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


# httpx raises these before the request is written: no connection was made, or none was free in the pool.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# What each client says, by (service, the request may have left, httpx timed out); {path} and {name}
# (the httpx exception's class) are filled in. Every transport failure is worth another try.
TRANSPORT_WORDING = {
    ("llm", False, False): "connection failed: {name}",
    ("llm", False, True): "request timed out",
    ("llm", True, True): "request timed out",
    ("llm", True, False): "connection failed: {name}",
    ("waha", False, False): "{path} could not connect: {name}",
    ("waha", False, True): "{path} could not connect: {name}",
    ("waha", True, True): "{path} timed out ({name})",
    ("waha", True, False): "{path} connection failed: {name}",
}


def transport_error(exc: httpx.TransportError, error: type[LLMError | WahaError], path: str = "") -> UpstreamError:
    """The project's error for an httpx transport failure; callers raise it `from None` (the message names it).

    Always transient. A WahaError also says whether the request may have left (maybe_delivered):
    a read timeout or a dropped connection after connecting may come after WAHA sent the text.
    """
    may_have_left = not isinstance(exc, NOT_SENT)
    wording = TRANSPORT_WORDING[error.service, may_have_left, isinstance(exc, httpx.TimeoutException)]
    message = wording.format(path=path, name=type(exc).__name__)
    if issubclass(error, WahaError):
        return error(message, transient=True, maybe_delivered=may_have_left)
    return error(message, transient=True)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def error_message(response: httpx.Response) -> str:
    """A short, secret-free description of an upstream error body."""
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason_phrase or "no body")[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            raw_metadata = error.get("metadata")
            metadata: Mapping[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
            extra = " ".join(f"{k}={metadata[k]}" for k in ("error_type", "provider_name") if metadata.get(k))
            return f"{message} {extra}".strip()[:200]
        for key in ("error", "message"):
            if body.get(key):
                return str(body[key])[:200]
    return json.dumps(body)[:200]


def metric_status(error: UpstreamError) -> str:
    """A small, fixed set of label values: the HTTP status, or what went wrong without one."""
    if error.status is not None:
        return str(error.status)
    return "timeout" if "timed out" in str(error.args[0]) else "connection"


def backoff_seconds(attempt: int, *, base: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with +/-25% jitter, so retries from many chats do not line up."""
    growth: float = 2 ** (attempt - 1)  # an int, or a fraction for attempt < 1
    return base * growth * (0.75 + 0.5 * rng())


WAHA_MAX_CONNECTIONS = 100  # per worker; sendText takes milliseconds, so far fewer than LLM calls


def upstream_client(
    *, transport: httpx.AsyncBaseTransport | None, max_connections: int, timeout: httpx.Timeout
) -> httpx.AsyncClient:
    """A worker's client for one upstream: httpx over http11.KeepAliveTransport, or httpx's own one behind a proxy.

    httpx honours HTTP(S)_PROXY only with its default transport, so where the environment
    names a proxy that one is kept (with a bounded keep-alive set, which keeps its walk short).
    """
    proxied = bool({"http", "https", "all"} & urllib.request.getproxies_environment().keys())  # what httpx reads
    if transport is None and not proxied:
        transport = KeepAliveTransport(max_connections=max_connections)
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(max_connections, 64)),
    )
