"""WAHA client: request bodies valid against WAHA's OpenAPI spec, engine-specific responses, retries."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import respx

from fakes.fake_waha import validate_waha_request
from tests.test_upstream_errors import TABLE as TRANSPORT_TABLE
from whatsapp_webhook.upstream import WahaError
from whatsapp_webhook.waha import WahaClient, stays_under_api

BASE = "http://waha.test"


def run(coro_factory, responses: dict[str, list]) -> tuple[object, dict[str, respx.Route], list[float]]:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def scenario():
        async with httpx.AsyncClient() as http:
            client = WahaClient(http=http, base_url=BASE, api_key="waha-key", sleep=fake_sleep, rng=lambda: 0.5)
            try:
                return await coro_factory(client)
            except WahaError as exc:
                return exc

    with respx.mock(using="http11", assert_all_called=False) as router:
        routes = {}
        for path, side_effect in responses.items():
            routes[path] = router.post(BASE + path)
            routes[path].side_effect = side_effect
        result = asyncio.run(scenario())
    return result, routes, sleeps


def sent_bodies(route: respx.Route) -> list[dict]:
    return [json.loads(call.request.content) for call in route.calls]


@pytest.mark.parametrize("chat_id", ["5511988887777@c.us", "200000000000002@lid", "120363000000000001@g.us"])
def test_send_text_body_is_valid_for_waha_and_keeps_the_chat_id_as_received(chat_id: str) -> None:
    _, routes, _ = run(lambda c: c.send_text(session="default", chat_id=chat_id, text="Olá!"),
                            {"/api/sendText": [httpx.Response(201, json={})]})
    (body,) = sent_bodies(routes["/api/sendText"])
    assert body == {"session": "default", "chatId": chat_id, "text": "Olá!"}
    assert validate_waha_request("/api/sendText", body) == []
    assert routes["/api/sendText"].calls[0].request.headers["X-Api-Key"] == "waha-key"


def test_presence_bodies_are_valid_for_waha() -> None:
    async def calls(client: WahaClient) -> None:
        await client.send_seen(session="s1", chat_id="120363000000000001@g.us",
                               message_id="false_120363000000000001@g.us_AAA_200000000000002@lid",
                               participant="200000000000002@lid")
        await client.start_typing(session="s1", chat_id="120363000000000001@g.us")
        await client.stop_typing(session="s1", chat_id="120363000000000001@g.us")

    ok = [httpx.Response(201, json={})]
    _, routes, _ = run(calls, {p: ok for p in ("/api/sendSeen", "/api/startTyping", "/api/stopTyping")})
    for path, route in routes.items():
        (body,) = sent_bodies(route)
        assert body["session"] == "s1" and validate_waha_request(path, body) == []


@pytest.mark.parametrize("response_body, expected", [
    # WEBJS: whatsapp-web.js message object
    ({"id": {"fromMe": True, "remote": "x@c.us", "id": "3EB0ABC", "_serialized": "true_x@c.us_3EB0ABC"}},
     "true_x@c.us_3EB0ABC"),
    # NOWEB: Baileys WebMessageInfo (WAHA issue #760)
    ({"key": {"remoteJid": "x@s.whatsapp.net", "fromMe": True, "id": "3EB08A6895830F110A5E4D"},
      "message": {"extendedTextMessage": {"text": "Hi"}}, "messageTimestamp": "1738070128", "status": "PENDING"},
     "3EB08A6895830F110A5E4D"),
    # GOWS: whatsmeow-style
    ({"Info": {"ID": "3EB0GOWS", "IsFromMe": True}}, "3EB0GOWS"),
    # a normalized WAMessage
    ({"id": "true_x@c.us_AAAA", "body": "Hi"}, "true_x@c.us_AAAA"),
    ({}, None),
])
def test_sent_message_id_is_read_from_each_engines_response(response_body: dict, expected: str | None) -> None:
    result, _, _ = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                       {"/api/sendText": [httpx.Response(201, json=response_body)]})
    assert result == expected


def test_empty_201_body_is_still_a_success() -> None:
    result, _, _ = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                       {"/api/sendText": [httpx.Response(201, content=b"")]})
    assert result is None


SESSION_NOT_READY = {"error": "Session status is not as expected. Try again later or restart the session",
                     "session": "default", "status": "STARTING", "expected": ["WORKING"]}


@pytest.mark.parametrize("first", [
    httpx.Response(422, json=SESSION_NOT_READY),
    httpx.Response(429, json={"statusCode": 429}),
    httpx.ConnectError("connection refused"),
    httpx.ConnectTimeout("no connection"),
])
def test_send_failures_that_surely_sent_nothing_are_retried(first) -> None:
    result, routes, sleeps = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                                 {"/api/sendText": [first, httpx.Response(201, json={"id": "ok"})]})
    assert result == "ok" and routes["/api/sendText"].call_count == 2 and sleeps == [1.0]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_permanent_send_failures_are_not_retried(status: int) -> None:
    result, routes, _ = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                            {"/api/sendText": [httpx.Response(status, json={"message": "Unauthorized",
                                                                             "statusCode": status})] * 3})
    assert isinstance(result, WahaError) and result.status == status and not result.transient
    assert routes["/api/sendText"].call_count == 1
    assert "waha-key" not in str(result)


def test_retries_are_bounded() -> None:
    result, routes, sleeps = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                                 {"/api/sendText": [httpx.Response(422, json=SESSION_NOT_READY)] * 5})
    assert isinstance(result, WahaError) and result.transient
    assert routes["/api/sendText"].call_count == 3 and sleeps == [1.0, 2.0]


@pytest.mark.parametrize("lost_answer", [
    httpx.ReadTimeout("timed out"),
    httpx.RemoteProtocolError("closed"),
    httpx.Response(500, json={"statusCode": 500, "exception": {"message": "engine error"}}),
    httpx.Response(504, text="Gateway Timeout"),  # a proxy gave up; WAHA may still have sent it
])
def test_a_lost_answer_is_not_resent_blindly(lost_answer) -> None:
    result, routes, sleeps = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                                 {"/api/sendText": [lost_answer, httpx.Response(201, json={"id": "ok"})]})
    assert isinstance(result, WahaError) and result.maybe_delivered and result.transient
    assert routes["/api/sendText"].call_count == 1 and sleeps == []


def test_find_sent_text_asks_for_our_recent_messages_in_the_chat() -> None:
    async def scenario():
        async with httpx.AsyncClient() as http:
            client = WahaClient(http=http, base_url=BASE, api_key="waha-key")
            return await client.find_sent_texts(session="loja 1", chat_id="200000000000002@lid", text="Olá!",
                                                since=1700000000.5)

    with respx.mock(using="http11") as router:
        route = router.get(f"{BASE}/api/loja%201/chats/200000000000002%40lid/messages").respond(200, json=[
            {"id": "true_200000000000002@lid_AAA", "body": "Outra coisa", "fromMe": True},
            {"id": "true_200000000000002@lid_BBB", "body": "Olá!", "fromMe": True}])
        found = asyncio.run(scenario())
    assert [m["id"] for m in found] == ["true_200000000000002@lid_BBB"]
    params = route.calls[0].request.url.params
    assert (params["filter.fromMe"], params["filter.timestamp.gte"], params["limit"]) == ("true", "1700000000", "20")


@pytest.mark.parametrize("failure, message, maybe_delivered", [(row[0], row[2], row[3]) for row in TRANSPORT_TABLE],
                         ids=[row[0].__name__ for row in TRANSPORT_TABLE])
def test_a_transport_failure_is_the_shared_mappings_waha_error(failure: type[httpx.TransportError], message: str,
                                                               maybe_delivered: bool) -> None:
    result, routes, _ = run(lambda c: c.send_text(session="default", chat_id="x@c.us", text="Hi"),
                            {"/api/sendText": [failure("boom")] * 3})
    assert isinstance(result, WahaError) and result.args == (message,) and result.transient
    assert result.maybe_delivered is maybe_delivered
    # Sent again only while WAHA surely sent nothing.
    assert routes["/api/sendText"].call_count == (1 if maybe_delivered else 3)


@pytest.mark.parametrize("session, chat_id", [("..", "5511988887777@c.us"), ("default", ".."), (".", ".")])
def test_a_path_that_would_leave_wahas_api_is_never_requested(session: str, chat_id: str) -> None:
    async def scenario():
        async with httpx.AsyncClient() as http:
            client = WahaClient(http=http, base_url=BASE, api_key="waha-key")
            try:
                return await client.find_sent_texts(session=session, chat_id=chat_id, text="x", since=0)
            except WahaError as exc:
                return exc

    with respx.mock(using="http11", assert_all_called=False) as router:
        anywhere = router.route().respond(200, json=[])
        result = asyncio.run(scenario())
    assert isinstance(result, WahaError) and not result.transient and "leaves WAHA's /api/" in str(result)
    assert anywhere.call_count == 0  # the API key never went anywhere


@pytest.mark.parametrize("path, safe", [
    ("/api/sendText", True), ("/api/default/chats/5511%40c.us/messages", True), ("/api/../sessions", False),
    ("/api/%2E%2E/sessions", False), ("/api/x/./y", False), ("/other", False), ("/api/a%5C..%5Cb", False),  # some servers read \\ as /
])
def test_paths_are_checked_as_a_server_would_resolve_them(path: str, safe: bool) -> None:
    assert stays_under_api(path) is safe
