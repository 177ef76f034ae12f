"""Shared fixtures: settings for tests, an app wired to respx-mocked upstreams, and helpers to post WAHA events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import respx
import respx.mocks

from fakes import waha_payloads as wp
from fakes.fake_openrouter import CURRENT_MODELS, FakeOpenRouter
from fakes.fake_waha import validate_waha_request
from tests import postgres
from whatsapp_webhook import WEBHOOK_PATH
from whatsapp_webhook.app import create_app, shutdown
from whatsapp_webhook.settings import Settings

LLM_BASE = "https://llm.test/api/v1"
WAHA_BASE = "http://waha.test"
WAHA_KEY = "test-waha-key"
LLM_KEY = "test-llm-key"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    postgres.stop()  # the session's PostgreSQL server, if a test started it


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        openrouter_api_key=LLM_KEY, openrouter_base_url=LLM_BASE, waha_base_url=WAHA_BASE,
        waha_api_key=WAHA_KEY, state_db=str(tmp_path / "state.db"), log_file=None,
        typing_simulation=False, webhook_sync_wait_seconds=10.0, llm_attempt_timeout_seconds=5.0,
        llm_deadline_seconds=8.0, waha_timeout_seconds=2.0, debounce_seconds=0.0)
    values.update(overrides)
    return Settings(**values)


async def no_sleep(seconds: float) -> None:
    """Backoff and typing pauses are recorded by the tests that care, never actually waited."""
    SLEEPS.append(seconds)


SLEEPS: list[float] = []


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return make_settings(tmp_path)


class Upstreams:
    """respx routes for WAHA and the LLM, with the defaults a healthy deployment would give."""

    def __init__(self, router: respx.MockRouter) -> None:
        self.router = router
        self.delivered: list[dict[str, Any]] = []
        self.llm = router.post(f"{LLM_BASE}/chat/completions", name="llm")
        self.llm.side_effect = self._echo_completion
        self.send_text = router.post(f"{WAHA_BASE}/api/sendText", name="sendText")
        self.send_text.side_effect = self._waha_ok
        for path in ("sendSeen", "startTyping", "stopTyping"):
            router.post(f"{WAHA_BASE}/api/{path}", name=path).side_effect = self._waha_ok
        self.chat_messages = router.get(url__regex=rf"{WAHA_BASE}/api/[^/]+/chats/[^/]+/messages", name="chatMessages")
        self.chat_messages.side_effect = self._our_messages_in_chat
        # Media: WAHA's /api/files (404 unless a test serves a file there), and the model list with its input kinds
        self.files: dict[str, tuple[bytes, str]] = {}
        self.media = router.get(url__regex=rf"{WAHA_BASE}/api/files/.*", name="files")
        self.media.side_effect = self._serve_file
        self.models = router.get(f"{LLM_BASE}/models", name="models")
        self.models.side_effect = lambda request: httpx.Response(200, json={"data": [
            FakeOpenRouter._model_entry(m) for m in CURRENT_MODELS]})

    def serve_media(self, envelope: dict[str, Any], data: bytes, mimetype: str = "application/octet-stream") -> None:
        """WAHA has this file at the envelope's media.url (as rewritten to WAHA_BASE_URL)."""
        self.files[urlsplit(envelope["payload"]["media"]["url"]).path] = (data, mimetype)

    def _serve_file(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("X-Api-Key") != WAHA_KEY:
            return httpx.Response(401, json={"message": "Unauthorized", "statusCode": 401})
        if request.url.path not in self.files:
            return httpx.Response(404, json={"message": "Not Found", "statusCode": 404})
        data, mimetype = self.files[request.url.path]
        return httpx.Response(200, content=data, headers={"Content-Type": mimetype})

    @staticmethod
    def _echo_completion(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        content = body["messages"][-1]["content"]
        if isinstance(content, list):  # text and media parts: the texts, and a tag per media part
            content = " ".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in content)
        return httpx.Response(200, json=completion(f"Echo: {content}", model=body["model"]))

    def _waha_ok(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        errors = validate_waha_request(request.url.path, body)
        if request.headers.get("X-Api-Key") != WAHA_KEY:
            return httpx.Response(401, json={"message": "Unauthorized", "statusCode": 401})
        if errors:
            return httpx.Response(400, json={"statusCode": 400, "message": errors, "error": "Bad Request"})
        if request.url.path == "/api/sendText":
            self.delivered.append(body)
            return httpx.Response(201, json={"id": {"fromMe": True, "remote": body["chatId"], "id": "3EB0AAAA",
                                                    "_serialized": f"true_{body['chatId']}_3EB0AAAA"}})
        return httpx.Response(201, json={})

    def _our_messages_in_chat(self, request: httpx.Request) -> httpx.Response:
        """What WAHA would list for the chat: the texts it accepted from us there."""
        chat = unquote(request.url.path.split("/")[4])
        return httpx.Response(200, json=[{"id": f"true_{chat}_3EB0AAAA", "fromMe": True, "body": sent["text"]}
                                         for sent in self.sent_texts() if sent["chatId"] == chat])

    def sent_texts(self) -> list[dict[str, Any]]:
        """What customers received (including sends whose HTTP answer a test then loses)."""
        return list(self.delivered)

    def calls_to(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(call.request.content) for call in self.router.routes[name].calls]


def completion(content: Any, *, model: str = "google/gemini-3.1-flash-lite", finish_reason: str = "stop") -> dict[str, Any]:
    """An OpenRouter chat completion body as documented (choices, usage, model actually used)."""
    return {"id": "gen-123", "object": "chat.completion", "created": 1700000000, "model": model,
            "provider": "Google",
            "choices": [{"index": 0, "finish_reason": finish_reason, "native_finish_reason": "STOP",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}}


class Http11Mocker(respx.mocks.HTTPCoreMocker):
    """respx at the worker's transport seam: `respx.mock(using="http11")`.

    The worker's clients run on whatsapp_webhook.http11.KeepAliveTransport, not httpcore, so
    respx's default patch never sees their requests. This one patches both: httpcore for plain
    httpx clients, and our transport's handle_async_request, whose request is already an
    httpx.Request and whose response is handed back unread, on the route's own stream (as a socket would:
    aiter_raw works, and a streamed route is read as it yields).
    """

    name = "http11"
    targets: ClassVar[list[str]] = [*respx.mocks.HTTPCoreMocker.targets, "whatsapp_webhook.http11.KeepAliveTransport"]

    @classmethod
    def prepare_async_request(cls, httpx_request: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs["request"], httpx.Request):
            return respx.mocks.AbstractRequestMocker.prepare_async_request(httpx_request, **kwargs)
        return super().prepare_async_request(httpx_request, **kwargs)

    @classmethod
    def to_httpx_request(cls, **kwargs: Any) -> Any:
        request = kwargs["request"]
        return request if isinstance(request, httpx.Request) else super().to_httpx_request(**kwargs)

    @classmethod
    async def from_async_httpx_response(cls, httpx_response: Any, target: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs["request"], httpx.Request):
            return httpx.Response(httpx_response.status_code, headers=httpx_response.headers.raw,
                                  stream=httpx_response.stream,
                                  extensions=httpx_response.extensions)
        return await super().from_async_httpx_response(httpx_response, target, **kwargs)


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    with respx.mock(using="http11", assert_all_mocked=True, assert_all_called=False) as router:
        yield Upstreams(router)


@pytest.fixture
def make_app(tmp_path: Any, upstreams: Upstreams) -> Iterator[Any]:
    apps: list[Any] = []
    SLEEPS.clear()

    def build(**overrides: Any) -> Any:
        app = create_app(make_settings(tmp_path, **overrides), sleep=no_sleep)
        apps.append(app)
        return app

    yield build
    for app in apps:
        shutdown(app)


@pytest.fixture
def client(make_app: Any) -> Any:
    return make_app().test_client()


def post_event(client: Any, envelope: dict[str, Any] | bytes, *, hmac_key: str | None = None,
               headers: dict[str, str] | None = None, content_type: str = "application/json") -> Any:
    """POST a webhook exactly as WAHA does: compact JSON bytes, optional HMAC over those bytes."""
    body = envelope if isinstance(envelope, bytes) else wp.dumps(envelope)
    all_headers = {"X-Webhook-Request-Id": "req-test"}
    if hmac_key is not None:
        all_headers.update({"X-Webhook-Hmac": wp.sign(body, hmac_key), "X-Webhook-Hmac-Algorithm": "sha512"})
    all_headers.update(headers or {})
    return client.post(WEBHOOK_PATH, data=body, headers=all_headers, content_type=content_type)
