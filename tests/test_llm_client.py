"""LLM client against OpenRouter's documented behaviour (errors, 200-with-error, Retry-After), faked with respx."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx

from tests.conftest import completion
from tests.test_upstream_errors import TABLE as TRANSPORT_TABLE
from whatsapp_webhook.llm import LLMClient, LLMReply, ModelUnavailableError, UnservedModels
from whatsapp_webhook.logs import MessageLog
from whatsapp_webhook.metrics import LLM_COST_USD, LLM_MODEL_UNAVAILABLE
from whatsapp_webhook.upstream import EmptyReplyError, LLMError, parse_retry_after

URL = "https://openrouter.ai/api/v1/chat/completions"
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Oi"}]


def run_client(route_responses: list[httpx.Response | Exception], **options) -> tuple[object, list[float], respx.Route]:
    """Run one complete() call against scripted responses; return (result or error, sleeps, route)."""
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def scenario():
        async with httpx.AsyncClient() as http:
            client = LLMClient(http=http, base_url="https://openrouter.ai/api/v1", api_key="sk-or-v1-test",
                                      model="google/gemini-3.1-flash-lite", sleep=fake_sleep, rng=lambda: 0.5,
                                      **options)
            try:
                return await client.complete(PROMPT, user="hash")
            except LLMError as exc:
                return exc

    with respx.mock(using="http11", assert_all_called=False) as router:
        route = router.post(URL)
        route.side_effect = route_responses
        result = asyncio.run(scenario())
    return result, sleeps, route


def error_body(code: int, message: str = "Provider returned error") -> dict:
    return {"error": {"code": code, "message": message, "metadata": {"provider_name": "Google", "raw": "x"}}}


def test_sends_model_messages_limits_and_bearer_key() -> None:
    reply, _, route = run_client([httpx.Response(200, json=completion("Olá! Como posso ajudar?"))])
    assert isinstance(reply, LLMReply) and reply.text == "Olá! Como posso ajudar?"
    assert reply.attempts == 1 and reply.usage["total_tokens"] == 30
    request = route.calls[0].request
    assert request.headers["Authorization"] == "Bearer sk-or-v1-test"
    body = json.loads(request.content)
    assert body == {"model": "google/gemini-3.1-flash-lite", "messages": PROMPT, "max_tokens": 512,
                    "temperature": 0.7, "user": "hash"}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_then_succeed(status: int) -> None:
    reply, sleeps, route = run_client([httpx.Response(status, json=error_body(status)),
                                       httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, LLMReply) and reply.text == "ok" and reply.attempts == 2
    assert route.call_count == 2 and len(sleeps) == 1


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404])
def test_client_errors_are_never_retried(status: int) -> None:
    error, sleeps, route = run_client([httpx.Response(status, json=error_body(status, "No auth credentials found")),
                                       httpx.Response(200, json=completion("never"))])
    assert isinstance(error, LLMError) and error.status == status and not error.transient
    assert route.call_count == 1 and sleeps == []
    assert "sk-or-v1-test" not in str(error)


def test_retry_after_seconds_is_honoured() -> None:
    reply, sleeps, _ = run_client([httpx.Response(429, headers={"Retry-After": "2"}, json=error_body(429)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, LLMReply) and sleeps == [2.0]


def test_retry_after_http_date_is_honoured() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    reply, sleeps, _ = run_client([httpx.Response(503, headers={"Retry-After": when}, json=error_body(503)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, LLMReply) and 1.0 < sleeps[0] <= 3.0


def test_retry_after_beyond_the_cap_gives_up_at_once() -> None:
    error, sleeps, route = run_client([httpx.Response(429, headers={"Retry-After": "3600"}, json=error_body(429)),
                                       httpx.Response(200, json=completion("never"))])
    assert isinstance(error, LLMError) and "3600" in str(error)
    assert route.call_count == 1 and sleeps == []


def test_without_retry_after_backoff_grows() -> None:
    error, sleeps, route = run_client([httpx.Response(500, json=error_body(500))] * 3, max_attempts=3)
    assert isinstance(error, LLMError) and error.status == 500
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
    assert isinstance(reply, LLMReply) and reply.text == "ok" and route.call_count == 2
    error, _, _ = run_client([httpx.Response(200, json=body)] * 3)
    assert isinstance(error, LLMError) and what in str(error)


@pytest.mark.parametrize("content", ["", "   \n", None])
def test_empty_content_gets_exactly_one_quick_retry(content) -> None:
    error, sleeps, route = run_client([httpx.Response(200, json=completion(content))] * 3, max_attempts=3)
    assert isinstance(error, EmptyReplyError)
    assert route.call_count == 2 and len(sleeps) == 1


def test_malformed_json_and_connection_errors_are_transient() -> None:
    reply, _, route = run_client([httpx.Response(200, text="<html>oops</html>"),
                                  httpx.ConnectError("refused"),
                                  httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, LLMReply) and route.call_count == 3


def test_one_deadline_bounds_all_attempts() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json=completion("late"))

    async def scenario():
        async with httpx.AsyncClient() as http:
            client = LLMClient(http=http, base_url="https://openrouter.ai/api/v1", api_key="k", model="m",
                                      attempt_timeout=0.2, deadline=0.5, max_attempts=10, backoff_base=0.01)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(LLMError, match="no answer within"):
                await client.complete(PROMPT)
            return loop.time() - started

    with respx.mock(using="http11", assert_all_called=False) as router:  # a cancelled call is never recorded as made
        router.post(URL).side_effect = hang
        elapsed = asyncio.run(scenario())
    assert elapsed < 1.0  # deadline 0.5 s, not 10 attempts x 0.2 s


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_a_402_with_retry_after_is_the_in_flight_budget_and_is_retried() -> None:
    reply, sleeps, _ = run_client([httpx.Response(402, headers={"Retry-After": "1"}, json=error_body(402)),
                                   httpx.Response(200, json=completion("ok"))])
    assert isinstance(reply, LLMReply) and sleeps == [1.0]


def test_a_content_filtered_reply_is_not_sent() -> None:
    error, _, route = run_client([httpx.Response(200, json=completion("partial", finish_reason="content_filter"))])
    assert isinstance(error, LLMError) and not error.transient and route.call_count == 1


def test_finish_error_with_a_client_error_code_is_not_retried() -> None:
    body = {"choices": [{"finish_reason": "error", "error": {"code": 400, "message": "bad"},
                         "message": {"role": "assistant", "content": ""}}]}
    error, _, route = run_client([httpx.Response(200, json=body)] * 2)
    assert isinstance(error, LLMError) and route.call_count == 1


# --- models that are not served --------------------------------------------------------------------

LOCAL_URL = "http://llm.local:11434/v1/chat/completions"


def not_served(request: httpx.Request) -> httpx.Response | None:
    """Like an Ollama/vLLM server that has only google/gemini-3.5-flash: any other model is a 404."""
    model = json.loads(request.content)["model"]
    if model == "google/gemini-3.5-flash":
        return httpx.Response(200, json=completion(f"answer from {model}", model=model))
    return httpx.Response(404, json={"error": {"message": f"model '{model}' not found", "type": "not_found"}})


def test_a_model_that_is_not_served_is_a_configuration_error_and_the_next_model_answers(caplog) -> None:
    sleeps: list[float] = []
    now = [1000.0]

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def scenario() -> list[LLMReply]:
        async with httpx.AsyncClient() as http:
            client = LLMClient(http=http, base_url="http://llm.local:11434/v1", api_key="",
                                      model="google/gemini-2.0-flash-001", fallback_models=["google/gemini-3.5-flash"],
                                      sleep=fake_sleep, clock=lambda: now[0])
            replies = [await client.complete(PROMPT, log=MessageLog(event="e1"))]
            now[0] += 30
            replies.append(await client.complete(PROMPT, log=MessageLog(event="e2")))
            now[0] += UnservedModels.RECHECK_SECONDS  # later the configured model is asked again
            replies.append(await client.complete(PROMPT, log=MessageLog(event="e3")))
            return replies

    unavailable = LLM_MODEL_UNAVAILABLE.labels("google/gemini-2.0-flash-001")
    before = unavailable._value.get()
    with respx.mock(using="http11") as router, caplog.at_level("ERROR", logger="whatsapp_webhook"):
        route = router.post(LOCAL_URL)
        route.side_effect = not_served
        first, second, third = asyncio.run(scenario())
    asked = [json.loads(call.request.content)["model"] for call in route.calls]
    # Not retried as transient (no backoff); the next message skips the retired id for a while.
    assert asked == ["google/gemini-2.0-flash-001", "google/gemini-3.5-flash", "google/gemini-3.5-flash",
                     "google/gemini-2.0-flash-001", "google/gemini-3.5-flash"]
    assert sleeps == [] and all("models" not in json.loads(c.request.content) for c in route.calls)
    assert first.text == "answer from google/gemini-3.5-flash" and first.from_fallback and first.attempts == 1
    assert first.unserved_models == ("google/gemini-2.0-flash-001",) and second.from_fallback and third.from_fallback
    assert unavailable._value.get() - before == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2  # at most once a minute
    assert "model=google/gemini-2.0-flash-001 setting=OPENROUTER_MODEL" in errors[0]
    assert "Set OPENROUTER_MODEL to a served id" in errors[0] and "--check" in errors[0]


def test_when_no_configured_model_is_served_each_is_asked_once_then_the_error_is_raised() -> None:
    error, sleeps, route = run_client(
        [httpx.Response(404, json={"error": {"code": 404, "message": "No endpoints found for google/gemini-3.1-flash-lite."}}),
         httpx.Response(400, json={"error": {"code": 400, "message": "x/y is not a valid model ID"}})],
        fallback_models=["x/y"])
    assert isinstance(error, ModelUnavailableError) and error.model == "x/y" and not error.transient
    assert route.call_count == 2 and sleeps == []


def test_openrouter_gets_the_fallback_list_and_minimal_reasoning_and_says_which_model_answered() -> None:
    reply, _, route = run_client([httpx.Response(200, json=completion("ok", model="google/gemini-3.5-flash"))],
                                 fallback_models=["google/gemini-3.5-flash"], openrouter=True,
                                 reasoning_effort="minimal")
    body = json.loads(route.calls[0].request.content)
    assert body["model"] == "google/gemini-3.1-flash-lite"
    assert body["models"] == ["google/gemini-3.1-flash-lite", "google/gemini-3.5-flash"]
    assert body["reasoning"] == {"effort": "minimal", "exclude": True}
    assert isinstance(reply, LLMReply) and reply.from_fallback and reply.answered_by == "google/gemini-3.5-flash"
    dated, _, _ = run_client([httpx.Response(200, json=completion("ok", model="google/gemini-3.1-flash-lite-20260507"))],
                             fallback_models=["google/gemini-3.5-flash"], openrouter=True)
    assert isinstance(dated, LLMReply) and not dated.from_fallback


def test_a_bare_404_is_not_blamed_on_the_model() -> None:
    # A base URL without /v1 answers 404 for the path: that is not a retired model.
    error, _, route = run_client([httpx.Response(404, text="404 page not found")], fallback_models=["b/other"])
    assert type(error) is LLMError and error.status == 404 and route.call_count == 1


def test_the_reported_cost_is_returned_and_counted() -> None:
    body = completion("ok")
    body["usage"]["cost"] = 0.00042
    before = LLM_COST_USD._value.get()
    reply, _, _ = run_client([httpx.Response(200, json=body)])
    assert isinstance(reply, LLMReply) and reply.cost_usd == 0.00042
    assert LLM_COST_USD._value.get() - before == pytest.approx(0.00042)
    free, _, _ = run_client([httpx.Response(200, json=completion("ok"))])
    assert isinstance(free, LLMReply) and free.cost_usd is None


@pytest.mark.parametrize("failure, message", [(row[0], row[1]) for row in TRANSPORT_TABLE],
                         ids=[row[0].__name__ for row in TRANSPORT_TABLE])
def test_a_transport_failure_is_the_shared_mappings_llm_error(failure: type[httpx.TransportError],
                                                              message: str) -> None:
    error, _, route = run_client([failure("boom")], max_attempts=1)
    assert type(error) is LLMError and error.args == (message,) and error.transient
    assert route.call_count == 1
