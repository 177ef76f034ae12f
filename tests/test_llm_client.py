"""LLM client against OpenRouter's documented behaviour (errors, 200-with-error, Retry-After), faked with respx."""

from __future__ import annotations

import asyncio
import json
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import respx

import whatsapp_webhook_server as server
from tests.conftest import completion

URL = "https://openrouter.ai/api/v1/chat/completions"
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Oi"}]


def run_client(route_responses: list[httpx.Response | Exception], **options) -> tuple[object, list[float], respx.Route]:
    """Run one complete() call against scripted responses; return (result or error, sleeps, route)."""
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def scenario():
        async with httpx.AsyncClient() as http:
            client = server.LLMClient(http=http, base_url="https://openrouter.ai/api/v1", api_key="sk-or-v1-test",
                                      model="google/gemini-2.0-flash-001", sleep=fake_sleep, rng=lambda: 0.5,
                                      **options)
            try:
                return await client.complete(PROMPT, user="hash")
            except server.LLMError as exc:
                return exc

    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL)
        route.side_effect = route_responses
        result = asyncio.run(scenario())
    return result, sleeps, route


def error_body(code: int, message: str = "Provider returned error") -> dict:
    return {"error": {"code": code, "message": message, "metadata": {"provider_name": "Google", "raw": "x"}}}


def test_sends_model_messages_limits_and_bearer_key() -> None:
    reply, _, route = run_client([httpx.Response(200, json=completion("Olá! Como posso ajudar?"))])
    assert isinstance(reply, server.LLMReply) and reply.text == "Olá! Como posso ajudar?"
    assert reply.attempts == 1 and reply.usage["total_tokens"] == 30
    request = route.calls[0].request
    assert request.headers["Authorization"] == "Bearer sk-or-v1-test"
    body = json.loads(request.content)
    assert body == {"model": "google/gemini-2.0-flash-001", "messages": PROMPT, "max_tokens": 512,
                    "temperature": 0.7, "user": "hash"}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_then_succeed(status: int) -> None:
    reply, sleeps, route = run_client([httpx.Response(status, json=error_body(status)),
                                       httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and reply.text == "ok" and reply.attempts == 2
    assert route.call_count == 2 and len(sleeps) == 1


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404])
def test_client_errors_are_never_retried(status: int) -> None:
    error, sleeps, route = run_client([httpx.Response(status, json=error_body(status, "No auth credentials found")),
                                       httpx.Response(200, json=completion("never"))])
    assert isinstance(error, server.LLMError) and error.status == status and not error.transient
    assert route.call_count == 1 and sleeps == []
    assert "sk-or-v1-test" not in str(error)


def test_retry_after_seconds_is_honoured() -> None:
    reply, sleeps, _ = run_client([httpx.Response(429, headers={"Retry-After": "2"}, json=error_body(429)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and sleeps == [2.0]


def test_retry_after_http_date_is_honoured() -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    reply, sleeps, _ = run_client([httpx.Response(503, headers={"Retry-After": when}, json=error_body(503)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and 1.0 < sleeps[0] <= 3.0


def test_retry_after_beyond_the_cap_gives_up_at_once() -> None:
    error, sleeps, route = run_client([httpx.Response(429, headers={"Retry-After": "3600"}, json=error_body(429)),
                                       httpx.Response(200, json=completion("never"))])
    assert isinstance(error, server.LLMError) and "3600" in str(error)
    assert route.call_count == 1 and sleeps == []


def test_without_retry_after_backoff_grows() -> None:
    error, sleeps, route = run_client([httpx.Response(500, json=error_body(500))] * 3, max_attempts=3)
    assert isinstance(error, server.LLMError) and error.status == 500
    assert route.call_count == 3 and sleeps == [0.5, 1.0]  # rng=0.5 removes the jitter


@pytest.mark.parametrize("body, what", [
    (error_body(502), "error in 200 body"),
    ({"choices": [{"finish_reason": "error", "error": {"code": 502, "message": "x"},
                   "message": {"role": "assistant", "content": "partial"}}]}, "finish_reason=error"),
    ({"id": "gen-1", "choices": []}, "no choices"),
    ({"id": "gen-1"}, "no choices"),
])
def test_200_without_a_usable_reply_is_a_failure_and_retried(body: dict, what: str) -> None:
    reply, _, route = run_client([httpx.Response(200, json=body), httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and reply.text == "ok" and route.call_count == 2
    error, _, _ = run_client([httpx.Response(200, json=body)] * 3)
    assert isinstance(error, server.LLMError) and what in str(error)


@pytest.mark.parametrize("content", ["", "   \n", None])
def test_empty_content_gets_exactly_one_quick_retry(content) -> None:
    error, sleeps, route = run_client([httpx.Response(200, json=completion(content))] * 3, max_attempts=3)
    assert isinstance(error, server.EmptyReplyError)
    assert route.call_count == 2 and len(sleeps) == 1


def test_malformed_json_and_connection_errors_are_transient() -> None:
    reply, _, route = run_client([httpx.Response(200, text="<html>oops</html>"),
                                  httpx.ConnectError("refused"),
                                  httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and route.call_count == 3


def test_one_deadline_bounds_all_attempts() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json=completion("late"))

    async def scenario():
        async with httpx.AsyncClient() as http:
            client = server.LLMClient(http=http, base_url="https://openrouter.ai/api/v1", api_key="k", model="m",
                                      attempt_timeout=0.2, deadline=0.5, max_attempts=10, backoff_base=0.01)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(server.LLMError, match="no answer within"):
                await client.complete(PROMPT)
            return loop.time() - started

    with respx.mock(assert_all_called=False) as router:  # a cancelled call is never recorded as made
        router.post(URL).side_effect = hang
        elapsed = asyncio.run(scenario())
    assert elapsed < 1.0  # deadline 0.5 s, not 10 attempts x 0.2 s


def test_parse_retry_after_forms() -> None:
    assert server.parse_retry_after("7") == 7.0
    assert server.parse_retry_after("1.5") == 1.5
    assert server.parse_retry_after("-3") == 0.0
    assert server.parse_retry_after(None) is None
    assert server.parse_retry_after("soon") is None
    assert server.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_a_402_with_retry_after_is_the_in_flight_budget_and_is_retried() -> None:
    reply, sleeps, _ = run_client([httpx.Response(402, headers={"Retry-After": "1"}, json=error_body(402)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, server.LLMReply) and sleeps == [1.0]


def test_a_content_filtered_reply_is_not_sent() -> None:
    error, _, route = run_client([httpx.Response(200, json=completion("partial", finish_reason="content_filter"))])
    assert isinstance(error, server.LLMError) and not error.transient and route.call_count == 1


def test_finish_error_with_a_client_error_code_is_not_retried() -> None:
    body = {"choices": [{"finish_reason": "error", "error": {"code": 400, "message": "bad"},
                         "message": {"role": "assistant", "content": ""}}]}
    error, _, route = run_client([httpx.Response(200, json=body)] * 2)
    assert isinstance(error, server.LLMError) and route.call_count == 1
