"""The WAHA client: the few calls a reply needs (sendText, seen, typing, 'did it go out?')."""

from __future__ import annotations

import asyncio
import random
from collections.abc import (
    Awaitable,
    Callable,
)
from typing import Any
from urllib.parse import quote, unquote

import httpx

from whatsapp_webhook.logs import MessageLog
from whatsapp_webhook.metrics import WAHA_ERRORS
from whatsapp_webhook.upstream import (
    TRANSIENT_STATUSES,
    WahaError,
    backoff_seconds,
    error_message,
    metric_status,
    transport_error,
)

FIXED_PATHS = ("/api/sendText", "/api/sendSeen", "/api/startTyping", "/api/stopTyping")  # the calls of every reply


class WahaClient:
    """The few WAHA calls a reply needs; every body carries `session` and matches WAHA's OpenAPI spec."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        send_attempts: int = 3,
        backoff_base: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Api-Key": api_key}
        # Parsed once: httpx parses a str URL on every request (half of build_request's ~50 µs).
        self._urls = {path: httpx.URL(self.base_url + path) for path in FIXED_PATHS}
        self.send_attempts = send_attempts
        self.backoff_base = backoff_base
        self.sleep = sleep
        self.rng = rng

    async def send_text(self, *, session: str, chat_id: str, text: str, reply_to: str | None = None) -> str | None:
        """Send a text (quoting `reply_to` if given); return the sent message id when the engine's response has one."""
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "text": text}
        if reply_to:
            body["reply_to"] = reply_to
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._post("/api/sendText", body)
                return extract_sent_message_id(response)
            except WahaError as exc:
                # Resending after a lost answer could give the customer two copies: the caller checks first.
                if not exc.transient or exc.maybe_delivered or attempt >= self.send_attempts:
                    raise
                delay = backoff_seconds(attempt, base=self.backoff_base, rng=self.rng)
                MessageLog(chat=chat_id).warning(
                    "sendText attempt %(attempt)d failed, retrying in %(delay).2fs: %(error)s",
                    {"attempt": attempt, "delay": delay, "error": str(exc)},
                )
                await self.sleep(delay)

    async def send_seen(self, *, session: str, chat_id: str, message_id: str, participant: str | None = None) -> None:
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "messageIds": [message_id]}
        if participant:
            body["participant"] = participant
        await self._post("/api/sendSeen", body)

    async def start_typing(self, *, session: str, chat_id: str) -> None:
        await self._post("/api/startTyping", {"session": session, "chatId": chat_id})

    async def stop_typing(self, *, session: str, chat_id: str) -> None:
        await self._post("/api/stopTyping", {"session": session, "chatId": chat_id})

    async def find_sent_texts(self, *, session: str, chat_id: str, text: str, since: float) -> list[dict[str, Any]]:
        """Our own messages with exactly this text in the chat since `since` (unix seconds), newest first.

        Used when a send was cut off: the reply may or may not have left.
        """
        path = f"/api/{quote(session, safe='')}/chats/{quote(chat_id, safe='')}/messages"
        params = {
            "limit": 20,
            "downloadMedia": "false",
            "filter.fromMe": "true",
            "sortOrder": "desc",
            "filter.timestamp.gte": int(since),
        }
        response = await self._request("GET", path, params=params)
        try:
            messages = response.json()
        except ValueError:
            raise WahaError(f"{path} answered with something that is not JSON", transient=False) from None
        if not isinstance(messages, list):
            raise WahaError(f"{path} answered with something that is not a list", transient=False)
        return [m for m in messages if isinstance(m, dict) and m.get("body") == text]

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._request("POST", path, json=body)

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            return await self._call(method, path, **options)
        except WahaError as exc:
            endpoint = path if path.startswith("/api/send") or path.endswith("Typing") else "chat_messages"
            WAHA_ERRORS.labels(endpoint, metric_status(exc)).inc()
            raise

    async def _call(self, method: str, path: str, **options: Any) -> httpx.Response:
        if not stays_under_api(path):
            # Never sent: the API key must not go to a path outside WAHA's API.
            raise WahaError(f"refused to call {path!r}: it leaves WAHA's /api/", transient=False)
        try:
            url = self._urls[path] if path in self._urls else self.base_url + path
            response = await self.http.request(method, url, headers=self.headers, **options)
        except httpx.TransportError as exc:
            raise transport_error(exc, WahaError, path) from None
        if response.status_code in (200, 201):
            return response
        # 422 = the WAHA session is not WORKING yet; it may recover in seconds. A 5xx may come
        # from an engine or proxy that gave up after the message left, so it may have been delivered.
        status = response.status_code
        raise WahaError(
            f"{path} failed: {error_message(response)}",
            status=status,
            transient=status == 422 or status in TRANSIENT_STATUSES,
            maybe_delivered=status >= 500,
        )


def stays_under_api(path: str) -> bool:
    """True when `path`, as any server resolves it, is inside /api/: no '.' or '..' segment, escaped or not."""
    resolved = unquote(path.split("?", 1)[0])
    segments = resolved.split("/")
    return path.startswith("/api/") and "\\" not in resolved and not any(s in (".", "..") for s in segments)


def extract_sent_message_id(response: httpx.Response) -> str | None:
    """WAHA returns the engine's raw object: WEBJS `id._serialized`, NOWEB `key.id`, GOWS `ID`/`Info.ID`."""
    try:
        data = response.json()
    except ValueError:
        return None  # WEBJS 2025.6.5 answers 201 with an empty body
    if not isinstance(data, dict):
        return None
    candidates = [data.get("id"), data.get("key"), data.get("ID"), data.get("Info")]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            return candidate
        if isinstance(candidate, dict):
            for name in ("_serialized", "id", "ID"):
                value = candidate.get(name)
                if isinstance(value, str) and value:
                    return value
    return None
