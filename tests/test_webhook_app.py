"""The webhook through Flask's test client, with WAHA and the LLM faked at their HTTP boundary by respx."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from fakes import waha_payloads as wp
from tests.conftest import SLEEPS, completion, post_event
from whatsapp_webhook import EXTENSION_KEY, WEBHOOK_PATH, __version__, pipeline
from whatsapp_webhook.app import shutdown
from whatsapp_webhook.events import classify_event, parse_event
from whatsapp_webhook.settings import DEFAULT_FALLBACK_MESSAGE, DEFAULT_NON_TEXT_REPLY
from whatsapp_webhook.store_api import StoreUnavailable


def media_file(name: str) -> bytes:
    return (Path(__file__).resolve().parent.parent / "fakes" / "data" / "media" / name).read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def stats(client) -> dict:
    return client.get("/stats").get_json()["stats"]


# --- answering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("sender", [wp.CUSTOMER_PN, wp.CUSTOMER_LID])
def test_a_customer_text_is_answered_once_by_the_llm_in_the_same_chat_and_session(
        client, upstreams, engine: str, sender: str) -> None:
    envelope = wp.text_message(engine, body="Qual o horário de funcionamento?", sender=sender, session="loja-1")
    response = post_event(client, envelope)

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "processed"
    assert body["result"] == {"status": "success", "from_number": sender, "response_sent": True,
                              "message_id": f"true_{sender}_3EB0AAAA"}
    assert "timestamp" in body
    assert upstreams.sent_texts() == [{"session": "loja-1", "chatId": sender,
                                       "text": "Echo: Qual o horário de funcionamento?"}]
    (llm_request,) = upstreams.calls_to("llm")
    assert llm_request["model"] == "google/gemini-3.1-flash-lite"
    assert "models" not in llm_request and "reasoning" not in llm_request  # OpenRouter-only fields
    assert llm_request["messages"][0]["role"] == "system"
    assert "same language" in llm_request["messages"][0]["content"]
    assert llm_request["messages"][-1] == {"role": "user", "content": "Qual o horário de funcionamento?"}
    assert sender.split("@")[0] not in json.dumps(llm_request)  # the LLM sees a hash, not the number
    counts = stats(client)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_failed"]) == (1, 1, 0)


def test_a_custom_system_prompt_replaces_the_default(make_app, upstreams) -> None:
    client = make_app(ai_system_prompt="Você é a assistente da Padaria Central.").test_client()
    post_event(client, wp.text_message("WEBJS"))
    assert upstreams.calls_to("llm")[0]["messages"][0]["content"] == "Você é a assistente da Padaria Central."


def group_message(engine: str, body: str, **options) -> dict:
    envelope = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, body=body, **options)
    envelope["me"] = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
    return envelope


BOT_MENTION = "@" + wp.BOT_ID.split("@")[0]


def test_groups_are_answered_only_when_the_bot_is_addressed_and_the_reply_quotes(make_app, upstreams) -> None:
    client = make_app(reply_in_groups=True).test_client()
    chatter = post_event(client, group_message("NOWEB", "alguém viu o jogo ontem?"))
    assert chatter.get_json()["reason"] == "group_not_addressed"
    envelope = group_message("NOWEB", f"{BOT_MENTION} vocês abrem sábado?")
    response = post_event(client, envelope)
    assert response.get_json()["result"]["from_number"] == wp.GROUP_ID
    (sent,) = upstreams.sent_texts()
    assert sent["chatId"] == wp.GROUP_ID and sent["reply_to"] == envelope["payload"]["id"]


def test_quoting_one_of_the_bots_replies_in_a_group_addresses_it(make_app, upstreams) -> None:
    client = make_app(reply_in_groups=True).test_client()
    post_event(client, group_message("GOWS", f"{BOT_MENTION} qual o horário?"))
    bot_reply_id = "true_" + wp.GROUP_ID + "_3EB0AAAA"  # what the respx WAHA answered to sendText
    follow_up = group_message("GOWS", "e no domingo?", reply_to={"id": bot_reply_id, "participant": wp.OTHER_LID,
                                                                  "body": "Echo"})
    assert post_event(client, follow_up).get_json()["status"] == "processed"


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_photo_with_a_caption_goes_to_the_llm_with_the_caption_after_it(client, upstreams, engine: str) -> None:
    envelope = wp.media_message(engine, caption="Tem este modelo em azul?")
    photo = media_file("product.jpg")
    upstreams.serve_media(envelope, photo, "image/jpeg")
    post_event(client, envelope)
    assert upstreams.sent_texts()[0]["text"] == "Echo: <image_url> Tem este modelo em azul?"
    image, caption = upstreams.calls_to("llm")[0]["messages"][-1]["content"]
    assert image == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(photo)}}
    assert caption == {"type": "text", "text": "Tem este modelo em azul?"}


@pytest.mark.parametrize("kind", ["image", "audio", "sticker", "document"])
def test_with_media_off_media_without_a_caption_gets_the_text_only_note_and_no_llm_call(
        make_app, upstreams, kind: str) -> None:
    client = make_app(media_enabled=False).test_client()
    response = post_event(client, wp.media_message("GOWS", kind=kind))
    assert response.get_json()["result"]["status"] == "non_text"
    assert upstreams.sent_texts()[0]["text"] == DEFAULT_NON_TEXT_REPLY
    assert upstreams.llm.call_count == 0


def test_the_text_only_note_is_configurable(make_app, upstreams) -> None:
    client = make_app(non_text_reply="Only text, please.").test_client()
    post_event(client, wp.location_message("WEBJS"))
    assert upstreams.sent_texts()[0]["text"] == "Only text, please."


# --- what is ignored -----------------------------------------------------------------------------

@pytest.mark.parametrize("builder, reason", [
    (wp.message_ack, "event_not_handled"),
    (wp.session_status, "session_status"),
    (wp.own_api_message_any, "from_me"),
    (wp.own_app_message_any, "from_me"),
    (lambda e: wp.text_message(e, group=wp.GROUP_ID), "group_chat"),
    (wp.status_broadcast_message, "status_broadcast"),
    (wp.newsletter_message, "channel"),
    (wp.broadcast_list_message, "broadcast_list"),
])
@pytest.mark.parametrize("engine", wp.ENGINES)
def test_ignored_events_get_200_with_the_reason_and_cause_no_calls(client, upstreams, builder, reason, engine) -> None:
    response = post_event(client, builder(engine))
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored" and response.get_json()["reason"] == reason
    assert upstreams.llm.call_count == 0 and upstreams.send_text.call_count == 0
    counts = stats(client)
    assert counts["ignored_by_reason"] == {reason: 1} and counts["messages_received"] == 0


# --- nothing answered twice ----------------------------------------------------------------------

def test_a_redelivered_message_is_answered_once(client, upstreams) -> None:
    envelope = wp.text_message("WEBJS")
    assert post_event(client, envelope).get_json()["status"] == "processed"
    again = post_event(client, envelope)
    assert again.status_code == 200
    assert again.get_json() == {"status": "ignored", "reason": "duplicate", "detail": "message already answered"}
    assert upstreams.send_text.call_count == 1 and upstreams.llm.call_count == 1


def test_message_and_message_any_of_the_same_message_get_one_reply(client, upstreams) -> None:
    envelope = wp.text_message("NOWEB")
    twin = wp.text_message("NOWEB", event="message.any", message_id=envelope["payload"]["id"].split("_")[2])
    post_event(client, envelope)
    assert post_event(client, twin).get_json()["reason"] == "duplicate"
    assert upstreams.send_text.call_count == 1


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_one_message_delivered_under_its_lid_and_its_phone_number_gets_one_reply(client, upstreams, engine) -> None:
    by_lid, by_phone = wp.lid_and_pn_pair(engine)
    post_event(client, by_lid)
    assert post_event(client, by_phone).get_json()["reason"] == "duplicate"
    assert [t["chatId"] for t in upstreams.sent_texts()] == [by_lid["payload"]["from"]]


def test_concurrent_copies_while_the_first_is_still_thinking_get_one_reply(make_app, upstreams) -> None:
    async def slow_llm(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(200, json=completion("Resposta"))

    upstreams.llm.side_effect = slow_llm
    app = make_app()
    envelope = wp.text_message("GOWS")
    copies = [envelope, wp.text_message("GOWS", event="message.any", message_id=envelope["payload"]["id"].split("_")[2])]
    results: list[dict] = []

    def deliver(copy: dict) -> None:
        results.append(post_event(app.test_client(), copy).get_json())

    threads = [threading.Thread(target=deliver, args=(copies[i % 2],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["status"] for r in results) == ["ignored"] * 9 + ["processed"]
    assert upstreams.send_text.call_count == 1 and upstreams.llm.call_count == 1


# --- failures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("llm_response", [
    httpx.Response(401, json={"error": {"code": 401, "message": "No auth credentials found"}}),
    httpx.Response(402, json={"error": {"code": 402, "message": "Insufficient credits"}}),
    httpx.Response(200, json={"error": {"code": 502, "message": "Provider returned error"}}),
    httpx.Response(200, json=completion("")),
    httpx.ConnectError("refused"),
])
def test_when_the_llm_cannot_answer_the_customer_gets_the_fallback_and_it_counts_as_failed(
        client, upstreams, llm_response) -> None:
    upstreams.llm.side_effect = None
    upstreams.llm.mock(side_effect=[llm_response] * 5)
    response = post_event(client, wp.text_message("WEBJS"))
    assert response.status_code == 200
    assert response.get_json()["result"]["status"] == "fallback"
    (sent,) = upstreams.sent_texts()
    assert sent["text"] == DEFAULT_FALLBACK_MESSAGE
    counts = stats(client)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_failed"]) == (1, 0, 1)


def test_a_rate_limited_llm_is_retried_after_the_requested_wait(client, upstreams) -> None:
    upstreams.llm.side_effect = [httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"code": 429}}),
                                 httpx.Response(200, json=completion("Tudo certo"))]
    response = post_event(client, wp.text_message("WEBJS"))
    assert response.get_json()["result"]["status"] == "success"
    assert upstreams.sent_texts()[0]["text"] == "Tudo certo" and 2.0 in SLEEPS


def test_when_send_text_keeps_failing_waha_gets_503_and_only_the_redelivery_sends(client, upstreams) -> None:
    envelope = wp.text_message("NOWEB", body="Vocês abrem no domingo?")
    healthy = upstreams.send_text.side_effect
    upstreams.send_text.side_effect = lambda request: httpx.Response(500, json={"statusCode": 500})

    first = post_event(client, envelope)
    assert first.status_code == 503 and "redeliver" in first.get_json()["error"]
    # A 5xx may hide a delivered text: no blind resend; WAHA was asked whether it went out.
    assert upstreams.send_text.call_count == 1 and upstreams.chat_messages.call_count == 1
    counts = stats(client)
    assert counts["messages_retrying"] == 1 and counts["messages_processed"] == 0

    upstreams.send_text.side_effect = healthy
    second = post_event(client, envelope)  # WAHA retries with the same body
    assert second.status_code == 200 and second.get_json()["result"]["status"] == "success"
    assert upstreams.sent_texts() == [{"session": "default", "chatId": envelope["payload"]["from"],
                                       "text": "Echo: Vocês abrem no domingo?"}]
    assert upstreams.llm.call_count == 1  # the redelivery resends the stored reply
    assert post_event(client, envelope).get_json()["reason"] == "duplicate"
    counts = stats(client)
    assert (counts["messages_processed"], counts["messages_in_progress"]) == (1, 0)


def test_a_slow_reply_is_acknowledged_with_202_and_still_sent(make_app, upstreams) -> None:
    async def slow_llm(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return httpx.Response(200, json=completion("Demorei mas cheguei"))

    upstreams.llm.side_effect = slow_llm
    client = make_app(webhook_sync_wait_seconds=0.05).test_client()
    response = post_event(client, wp.text_message("WEBJS"))
    assert response.status_code == 202 and response.get_json()["status"] == "accepted"
    deadline = time.monotonic() + 5
    while not upstreams.sent_texts() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstreams.sent_texts()[0]["text"] == "Demorei mas cheguei"


def test_typing_simulation_follows_wahas_recipe_and_survives_presence_failures(make_app, upstreams) -> None:
    order: list[str] = []
    for name in ("sendSeen", "startTyping", "stopTyping", "sendText"):
        route = upstreams.router.routes[name]
        previous = route.side_effect
        route.side_effect = (lambda prev, n: lambda request: (order.append(n), prev(request))[1])(previous, name)
    upstreams.router.routes["sendSeen"].side_effect = lambda request: (order.append("sendSeen"),
                                                                       httpx.Response(500, json={}))[1]
    envelope = group_message("NOWEB", f"{BOT_MENTION} oi")
    client = make_app(typing_simulation=True, reply_in_groups=True).test_client()
    response = post_event(client, envelope)
    assert response.get_json()["result"]["status"] == "success"
    assert order == ["sendSeen", "startTyping", "stopTyping", "sendText"]
    seen = upstreams.calls_to("sendSeen")[0]
    assert seen["messageIds"] == [envelope["payload"]["id"]] and seen["participant"] == wp.CUSTOMER_LID
    assert any(0.5 <= pause <= 4.8 for pause in SLEEPS)  # the length-based typing pause, less the LLM time


def test_without_typing_simulation_there_are_no_presence_calls_and_no_pause(client, upstreams) -> None:
    post_event(client, wp.text_message("WEBJS"))
    called = [r.name for r in upstreams.router.routes if r.call_count]
    assert [name for name in called if name != "models"] == ["llm", "sendText"]  # models: the media kinds look-up
    assert SLEEPS == []


# --- bad input and authentication ----------------------------------------------------------------

@pytest.mark.parametrize("body, content_type, status, error", [
    (b"{broken", "application/json", 400, "not valid JSON"),
    (b"[]", "application/json", 400, "must be a JSON object"),
    (b"", "application/json", 400, "empty"),
    (b'{"event": "message"}', "text/plain", 415, "Content-Type must be application/json"),
    (b"\xc3\x28", "application/json", 400, "UTF-8"),
    (b'{"event": "message", "session": "default", "payload": {"from": 1, "id": "x"}}', "application/json", 400,
     "payload.from"),
])
def test_bad_input_gets_a_json_4xx_is_counted_and_the_server_keeps_serving(
        client, upstreams, body, content_type, status, error) -> None:
    response = post_event(client, body, content_type=content_type)
    assert response.status_code == status and response.is_json
    assert error in response.get_json()["error"]
    assert stats(client)["requests_rejected"] == 1
    assert post_event(client, wp.text_message("WEBJS")).get_json()["status"] == "processed"


def test_an_oversized_body_gets_413_json(make_app, upstreams) -> None:
    client = make_app(max_body_bytes=4096).test_client()
    envelope = wp.text_message("WEBJS", body="x" * 5000)
    response = post_event(client, envelope)
    assert response.status_code == 413 and "larger than 4096 bytes" in response.get_json()["error"]
    assert upstreams.llm.call_count == 0 and stats(client)["requests_rejected"] == 1


def test_unknown_routes_and_methods_answer_json(client) -> None:
    assert client.get("/nope").status_code == 404 and client.get("/nope").is_json
    response = client.put(WEBHOOK_PATH)
    assert response.status_code == 405 and response.is_json


def test_token_header_is_required_when_configured(make_app, upstreams) -> None:
    client = make_app(webhook_secret_token="tok-123").test_client()
    envelope = wp.text_message("WEBJS")
    for headers in ({}, {"X-Webhook-Token": "wrong"}):
        response = post_event(client, envelope, headers=headers)
        assert response.status_code == 401 and "X-Webhook-Token" in response.get_json()["error"]
    assert upstreams.llm.call_count == 0 and stats(client)["requests_unauthorized"] == 2
    assert post_event(client, envelope, headers={"X-Webhook-Token": "tok-123"}).status_code == 200
    assert upstreams.send_text.call_count == 1


def test_waha_hmac_is_required_when_configured(make_app, upstreams) -> None:
    client = make_app(webhook_hmac_key="hmac-key").test_client()
    envelope = wp.text_message("GOWS")
    assert post_event(client, envelope).status_code == 401
    assert post_event(client, envelope, hmac_key="other-key").status_code == 401
    tampered = wp.dumps(envelope).replace(b"Ol", b"ol")
    signed_original = {"X-Webhook-Hmac": wp.sign(wp.dumps(envelope), "hmac-key")}
    assert post_event(client, tampered, headers=signed_original).status_code == 401
    assert upstreams.llm.call_count == 0
    response = post_event(client, envelope, hmac_key="hmac-key")
    assert response.status_code == 200 and response.get_json()["status"] == "processed"


def test_authentication_is_checked_before_the_body_is_judged(make_app) -> None:
    client = make_app(webhook_hmac_key="hmac-key").test_client()
    response = post_event(client, b"{broken")
    assert response.status_code == 401


# --- status endpoints, logs ----------------------------------------------------------------------

def test_status_endpoints_share_the_documented_shape(client, upstreams) -> None:
    post_event(client, wp.text_message("WEBJS"))
    post_event(client, wp.message_ack("WEBJS"))
    for path, status, service in (("/health", "healthy", "whatsapp_webhook_server"),
                                  ("/stats", "ok", "whatsapp_webhook_server"),
                                  (WEBHOOK_PATH, "ok", "whatsapp_webhook")):
        document = client.get(path).get_json()
        assert document["status"] == status
        assert document["service"] == service and document["version"] == __version__ == "1.1.0"
        assert isinstance(document["uptime_seconds"], float) and "timestamp" in document
        counts = document["stats"]
        assert {k: counts[k] for k in ("messages_received", "messages_processed", "messages_failed")} == {
            "messages_received": 1, "messages_processed": 1, "messages_failed": 0}
        assert counts["ignored_by_reason"] == {"event_not_handled": 1}
        assert counts["server_started_at"].endswith("+00:00")


def test_health_reports_a_broken_store_with_503(make_app, tmp_path) -> None:
    app = make_app()
    store = app.extensions[EXTENSION_KEY].store

    def broken() -> None:
        raise StoreUnavailable("disk I/O error")

    store.ping = broken
    response = app.test_client().get("/health")
    assert response.status_code == 503 and response.get_json()["status"] == "unhealthy"
    checks = response.get_json()["checks"]
    assert checks["store"]["status"] == "failing" and "503" in checks["store"]["reason"]
    assert set(checks) == {"store", "llm", "waha"}


# --- /health tells the truth -------------------------------------------------------------------------

def health(client) -> tuple[int, dict]:
    response = client.get("/health")
    return response.status_code, response.get_json()


def test_health_is_healthy_with_every_check_ok_at_start(client) -> None:
    status, document = health(client)
    assert (status, document["status"], document["service"]) == (200, "healthy", "whatsapp_webhook_server")
    assert {name: check["status"] for name, check in document["checks"].items()} == {
        "store": "ok", "llm": "ok", "waha": "ok"}
    assert all(check["since"].endswith("+00:00") and check["reason"] for check in document["checks"].values())


def test_a_retired_configured_model_degrades_health_while_the_fallback_answers(make_app, upstreams) -> None:
    def served(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        if model != "google/gemini-3.5-flash":
            return httpx.Response(404, json={"error": {"code": 404, "message": f"No endpoints found for {model}."}})
        return httpx.Response(200, json=completion("Abrimos às 8h.", model=model))

    upstreams.llm.side_effect = served
    client = make_app(openrouter_model="google/gemini-2.0-flash-001",
                      openrouter_fallback_models=("google/gemini-3.5-flash",)).test_client()
    assert post_event(client, wp.text_message("WEBJS", body="Que horas abrem?")).get_json()["status"] == "processed"
    assert [sent["text"] for sent in upstreams.sent_texts()] == ["Abrimos às 8h."]
    status, document = health(client)
    assert (status, document["status"]) == (200, "degraded")
    llm = document["checks"]["llm"]
    assert llm["status"] == "degraded"
    assert "OPENROUTER_MODEL=google/gemini-2.0-flash-001 is not served" in llm["reason"]
    assert "google/gemini-3.5-flash" in llm["reason"]


def test_health_recovers_when_the_configured_model_answers_again(make_app, upstreams) -> None:
    def down_for_the_first_message(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["messages"][-1]["content"] == "um":
            return httpx.Response(503, json={"error": {"code": 503, "message": "No available providers"}})
        return httpx.Response(200, json=completion("ok"))

    upstreams.llm.side_effect = down_for_the_first_message
    client = make_app().test_client()
    post_event(client, wp.text_message("WEBJS", body="um"))
    assert health(client)[1]["checks"]["llm"]["status"] == "degraded"
    post_event(client, wp.text_message("WEBJS", body="dois"))
    assert health(client)[1]["status"] == "healthy"


@pytest.mark.parametrize("status, check, words", [
    (401, "failing", "rejected OPENROUTER_API_KEY"), (402, "failing", "out of credits"),
    (503, "degraded", "fell back to FALLBACK_MESSAGE"),
])
def test_llm_failures_that_cost_customers_their_answer_show_in_health(client, upstreams, status, check, words) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(status, json={"error": {"code": status,
                                                                                       "message": "nope"}})
    post_event(client, wp.text_message("WEBJS"))
    code, document = health(client)
    assert (code, document["status"]) == (200, "degraded")
    assert document["checks"]["llm"]["status"] == check and words in document["checks"]["llm"]["reason"]


def test_waha_session_status_events_and_422_answers_show_in_health(client, upstreams) -> None:
    response = post_event(client, wp.session_status("GOWS", status="SCAN_QR_CODE", session="loja-2"))
    assert response.get_json()["reason"] == "session_status"
    code, document = health(client)
    assert (code, document["status"], document["checks"]["waha"]["status"]) == (200, "degraded", "degraded")
    assert "WAHA session 'loja-2' is SCAN_QR_CODE" in document["checks"]["waha"]["reason"]
    post_event(client, wp.session_status("GOWS", status="WORKING", session="loja-2"))
    assert health(client)[1]["status"] == "healthy"

    upstreams.send_text.side_effect = lambda request: httpx.Response(422, json={
        "error": "Session status is not as expected. Try again later or restart the session",
        "session": "default", "status": "STARTING", "expected": ["WORKING"]})
    post_event(client, wp.text_message("WEBJS", session="default"))
    waha = health(client)[1]["checks"]["waha"]
    assert waha["status"] == "degraded" and waha["reason"] \
        == "WAHA session 'default' is not WORKING (sendText answered HTTP 422)"


def test_every_worker_reads_the_same_health_from_the_shared_store(make_app, upstreams) -> None:
    first, second = make_app(), make_app()  # two apps on one state file, as two gunicorn workers
    post_event(first.test_client(), wp.session_status("WEBJS", status="FAILED"))
    documents = [health(app.test_client())[1] for app in (first, second)]
    assert documents[0]["checks"] == documents[1]["checks"] and documents[1]["checks"]["waha"]["status"] == "failing"


def test_stats_add_up_what_the_llm_provider_says_replies_cost(client, upstreams) -> None:
    def priced(request: httpx.Request) -> httpx.Response:
        body = completion("ok")
        body["usage"]["cost"] = 0.000125
        return httpx.Response(200, json=body)

    upstreams.llm.side_effect = priced
    for text in ("um", "dois"):
        post_event(client, wp.text_message("WEBJS", body=text))
    assert stats(client)["llm_cost_usd"] == pytest.approx(0.00025)


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: (p.pop("from"), p.pop("id")), "no_chat"),
    (lambda p: p.pop("id"), "no_message_id"),
])
def test_a_signed_message_that_cannot_be_answered_gets_200_ignored_not_a_4xx(
        make_app, upstreams, mutate, reason) -> None:
    client = make_app(webhook_hmac_key="hk").test_client()
    envelope = wp.text_message("WEBJS")
    mutate(envelope["payload"])
    response = post_event(client, envelope, hmac_key="hk")  # WAHA would redeliver any 4xx, forever
    assert response.status_code == 200 and response.get_json()["reason"] == reason
    counts = stats(client)
    assert counts["ignored_by_reason"] == {reason: 1} and counts["messages_received"] == 0
    assert counts["messages_in_progress"] == 0 and upstreams.llm.call_count == 0


def test_logs_name_the_decision_but_never_the_text_or_secrets(make_app, upstreams, tmp_path, capsys) -> None:
    log_file = tmp_path / "webhook.log"
    client = make_app(log_file=str(log_file), webhook_secret_token="tok-secret-1").test_client()
    envelope = wp.text_message("WEBJS", body="meu cpf é 123.456.789-00")
    post_event(client, envelope, headers={"X-Webhook-Token": "tok-secret-1"})
    post_event(client, wp.message_ack("WEBJS"), headers={"X-Webhook-Token": "wrong"})
    console = capsys.readouterr().out
    written = log_file.read_text()
    for output in (console, written):
        assert f"event={envelope['id']} chat={envelope['payload']['from']}" in output
        assert "decision=replied outcome=success" in output and "rejected status=401" in output
        for secret in ("123.456.789-00", "tok-secret-1", "test-llm-key", "test-waha-key"):
            assert secret not in output


# --- sends whose outcome is unknown ----------------------------------------------------------------

@pytest.mark.parametrize("lost", ["read_timeout", "http_500_after_sending"])
def test_a_send_that_went_out_but_lost_its_answer_is_not_sent_again(client, upstreams, lost: str) -> None:
    healthy = upstreams.send_text.side_effect

    def delivered_then_lost(request: httpx.Request) -> httpx.Response:
        healthy(request)  # WhatsApp got the text...
        if lost == "read_timeout":  # ...but the answer never came back
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(500, json={"statusCode": 500})

    upstreams.send_text.side_effect = delivered_then_lost
    envelope = wp.text_message("WEBJS", body="Tem desconto?")
    response = post_event(client, envelope)
    assert response.status_code == 200 and response.get_json()["status"] == "processed"
    assert upstreams.send_text.call_count == 1 and upstreams.chat_messages.call_count == 1
    assert post_event(client, envelope).get_json()["reason"] == "duplicate"


# --- hostile or broken input ------------------------------------------------------------------------

@pytest.mark.parametrize("body, error", [
    (b'{"event":"message","session":"default","payload":{"from":"1@c.us","id":"x","timestamp":'
     + b"1" * 5000 + b"}}", "not usable JSON"),
    (b'{"event":"message","session":"default","payload":{"from":"1\\ud800@c.us","id":"x","body":"oi"}}',
     "invalid character"),
    (b'{"event":"message","session":"default","payload":{"from":"1@c.us","id":"x","body":"oi","timestamp":NaN}}',
     "finite number"),
    (b'{"event":"message","session":"default","payload":{"from":"1@c.us","id":"x","body":"oi","timestamp":1e999}}',
     "finite number"),
])
def test_hostile_json_gets_400_not_500(client, upstreams, body: bytes, error: str) -> None:
    response = post_event(client, body)
    assert response.status_code == 400 and error in response.get_json()["error"]
    assert upstreams.llm.call_count == 0


def test_a_non_ascii_signature_header_is_a_401_not_a_500(make_app) -> None:
    client = make_app(webhook_hmac_key="k").test_client()
    response = post_event(client, wp.message_ack("WEBJS"), headers={"X-Webhook-Hmac": "çççç"})
    assert response.status_code == 401


def test_a_text_cut_inside_an_emoji_is_still_answered(client, upstreams) -> None:
    envelope = wp.text_message("WEBJS", body="placeholder")
    body = wp.dumps(envelope).replace(b"placeholder", b"Oi \\ud83d")
    assert post_event(client, body).get_json()["status"] == "processed"
    assert upstreams.sent_texts()[0]["text"] == "Echo: Oi \ufffd"


# --- worker lifecycle -----------------------------------------------------------------------------

def test_shutdown_hands_unfinished_replies_back_to_the_inbox(make_app, upstreams) -> None:
    async def stuck_llm(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json=completion("late"))

    upstreams.llm.side_effect = stuck_llm
    app = make_app(webhook_sync_wait_seconds=0.1)
    envelope = wp.text_message("NOWEB")
    assert post_event(app.test_client(), envelope).status_code == 202
    store = app.extensions[EXTENSION_KEY].store
    key = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=False).dedupe_key
    deadline = time.monotonic() + 5
    while store.entry(key).status != "processing" and time.monotonic() < deadline:
        time.sleep(0.02)
    shutdown(app, drain_seconds=0.2)
    entry = store.entry(key)
    assert (entry.status, entry.attempts) == ("queued", 0)  # due again at once, attempt not held against it
    assert upstreams.send_text.call_count == 0


def test_slow_presence_calls_do_not_delay_the_reply(make_app, upstreams, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "PRESENCE_TIMEOUT_SECONDS", 0.1)

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(201, json={})

    for name in ("sendSeen", "startTyping", "stopTyping"):
        upstreams.router.routes[name].side_effect = slow
    client = make_app(typing_simulation=True).test_client()
    started = time.monotonic()
    response = post_event(client, wp.text_message("WEBJS"))
    assert response.status_code == 200 and response.get_json()["result"]["status"] == "success"
    assert time.monotonic() - started < 2


def test_an_unprotected_server_warns_at_start(make_app, capsys) -> None:
    make_app()
    assert "neither WEBHOOK_HMAC_KEY nor WEBHOOK_SECRET_TOKEN is set" in capsys.readouterr().out
    make_app(webhook_hmac_key="k")
    assert "neither WEBHOOK_HMAC_KEY" not in capsys.readouterr().out


def test_two_identical_replies_in_a_row_are_both_delivered(make_app, upstreams) -> None:
    """The 'did it go out?' check must not mistake the first copy for the second."""
    client = make_app(media_enabled=False).test_client()
    post_event(client, wp.media_message("WEBJS", kind="audio"))
    healthy = upstreams.send_text.side_effect
    upstreams.send_text.side_effect = lambda request: httpx.Response(500, json={"statusCode": 500})
    second = wp.media_message("WEBJS", kind="audio")
    assert post_event(client, second).status_code == 503  # not sent, and the earlier copy is not mistaken for it
    upstreams.send_text.side_effect = healthy
    assert post_event(client, second).get_json()["result"]["status"] == "non_text"
    assert [t["text"] for t in upstreams.sent_texts()] == [DEFAULT_NON_TEXT_REPLY] * 2


def test_during_a_key_rotation_webhooks_signed_with_either_key_are_accepted(make_app, upstreams) -> None:
    client = make_app(webhook_hmac_key="new-key-77, old-key-11").test_client()
    for n, key in enumerate(("old-key-11", "new-key-77")):
        response = post_event(client, wp.text_message("WEBJS", body=f"msg {n}"), hmac_key=key)
        assert response.status_code == 200 and response.get_json()["status"] == "processed"
    assert post_event(client, wp.text_message("WEBJS", body="x"), hmac_key="retired-key").status_code == 401


# --- floods and bodies the server cannot use ---------------------------------------------------------

def test_a_flood_of_rejected_and_ignored_requests_costs_one_store_write_not_one_each(make_app, upstreams) -> None:
    app = make_app(webhook_hmac_key="hmac-key")
    client, store = app.test_client(), app.extensions[EXTENSION_KEY].store
    writes: list[dict] = []
    count_many = store.count_many
    store.count = lambda *args, **kwargs: pytest.fail("one write per request")
    store.count_many = lambda amounts: (writes.append(dict(amounts)), count_many(amounts))
    for _ in range(50):
        assert post_event(client, wp.message_ack("WEBJS")).status_code == 401
        assert post_event(client, wp.message_ack("WEBJS"), hmac_key="hmac-key").status_code == 200
        assert post_event(client, b"{broken", hmac_key="hmac-key").status_code == 400
    assert writes == []  # nothing was written while the requests came in
    counts = stats(client)  # /stats writes this worker's counts first, in one transaction
    assert writes == [{"requests_unauthorized": 50, "ignored.event_not_handled": 50, "requests_rejected": 50}]
    assert (counts["requests_unauthorized"], counts["requests_rejected"]) == (50, 50)
    assert counts["ignored_by_reason"] == {"event_not_handled": 50}


def test_counts_a_failing_store_could_not_take_wait_for_the_next_flush(make_app, upstreams) -> None:
    app = make_app()
    client, service = app.test_client(), app.extensions[EXTENSION_KEY]
    count_many = service.store.count_many
    failures = iter([StoreUnavailable("disk I/O error")])

    def flaky(amounts):
        if (failure := next(failures, None)) is not None:
            raise failure
        count_many(amounts)

    service.store.count_many = flaky
    post_event(client, wp.message_ack("WEBJS"))
    service.tally.flush()  # fails: the count is kept
    post_event(client, wp.message_ack("WEBJS"))
    assert stats(client)["ignored_by_reason"] == {"event_not_handled": 2}


def test_rejections_are_logged_first_then_summed_up_in_one_line(make_app, upstreams, capsys) -> None:
    app = make_app(webhook_secret_token="tok")
    client = app.test_client()
    for _ in range(30):
        assert post_event(client, wp.message_ack("WEBJS")).status_code == 401
    shutdown(app)  # a worker's exit logs what it kept quiet
    lines = [line for line in capsys.readouterr().out.splitlines() if "rejected status=401" in line]
    assert len(lines) == 2, lines
    assert 'request=req-test rejected status=401 reason="missing or invalid X-Webhook-Token header"' in lines[0]
    assert "requests rejected status=401: 29 more since the last line" in lines[1]


def test_an_oversized_body_is_refused_without_reading_it_and_the_connection_closed(make_app, upstreams) -> None:
    client = make_app(max_body_bytes=4096).test_client()
    closed: list[bool] = []
    response = client.post(WEBHOOK_PATH, data=b"x" * 5000, content_type="application/json",
                           environ_overrides={"whatsapp_webhook.close_connection": lambda: closed.append(True)})
    assert response.status_code == 413 and closed == [True]
    assert response.get_json() == {"error": "request body is larger than 4096 bytes"}


class Stream:
    """wsgi.input that hands out `data`, then raises `error` (if any) instead of ending."""

    def __init__(self, data: bytes = b"", error: Exception | None = None) -> None:
        self.data, self.error, self.asked = data, error, []

    def read(self, size: int) -> bytes:
        self.asked.append(size)
        if self.error is not None:
            raise self.error
        data, self.data = self.data[:size], self.data[size:]
        return data


def test_the_whole_body_is_read_whatever_its_framing_or_refused_with_a_reason() -> None:
    from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkExtension, InvalidChunkSize, NoMoreData

    from whatsapp_webhook.app import BodyError, read_whole_body

    def read(stream: Stream, declared: int | None, terminated: bool = True) -> bytes | tuple[int, str]:
        environ = {"wsgi.input": stream, **({"wsgi.input_terminated": True} if terminated else {})}
        try:
            return read_whole_body(environ, declared, max_bytes=100)
        except BodyError as exc:
            return exc.status, exc.error

    assert read(Stream(b"{}"), 2) == b"{}"
    assert read(Stream(b"x" * 100), None) == b"x" * 100  # chunked, right at the limit
    declared_too_big = Stream(b"x" * 101)
    assert read(declared_too_big, 101) == (413, "request body is larger than 100 bytes")
    assert declared_too_big.asked == []  # refused before reading anything
    chunked_too_big = Stream(b"x" * 5000)
    assert read(chunked_too_big, None) == (413, "request body is larger than 100 bytes")
    assert chunked_too_big.asked == [101]  # one byte past the limit, then no more
    assert read(Stream(b"{}"), 50) == (400, "request body incomplete: got 2 of the 50 bytes announced")
    assert read(Stream(error=NoMoreData()), None)[0] == 400
    assert "incomplete" in read(Stream(error=NoMoreData()), None)[1]
    for error in (InvalidChunkSize(b"zz"), ChunkMissingTerminator(b"XX"), InvalidChunkExtension("bad")):
        status, message = read(Stream(error=error), None)
        assert status == 400 and message.startswith("malformed chunked request body: Invalid chunk")
    assert read(Stream(error=TimeoutError()), 10)[0] == 408
    assert read(Stream(b"{}"), None, terminated=False) == b""  # no length, no framing server: no body


def test_a_signed_event_replayed_long_after_is_ignored_as_stale(make_app, upstreams) -> None:
    client = make_app(webhook_hmac_key="hk", webhook_stale_seconds=3600).test_client()
    now_ms = int(time.time() * 1000)
    old = wp.text_message("WEBJS", body="replayed", timestamp_ms=now_ms - 2 * 3600 * 1000)
    response = post_event(client, old, hmac_key="hk")
    assert (response.status_code, response.get_json()["reason"]) == (200, "stale_event")  # WAHA would retry a 4xx
    assert upstreams.llm.call_count == 0 and stats(client)["messages_received"] == 0
    fresh = wp.text_message("WEBJS", body="fresh", timestamp_ms=now_ms - 60_000)
    assert post_event(client, fresh, hmac_key="hk").get_json()["status"] == "processed"
    undated = wp.text_message("WEBJS", body="older WAHA")
    undated.pop("timestamp", None)  # WAHA of 2024 sent no envelope timestamp: accepted
    assert post_event(client, undated, hmac_key="hk").get_json()["status"] == "processed"


def test_without_hmac_the_envelope_timestamp_is_not_trusted_for_anything(make_app, upstreams) -> None:
    client = make_app(webhook_stale_seconds=3600).test_client()
    old = wp.text_message("WEBJS", body="old but unsigned", timestamp_ms=int(time.time() * 1000) - 7 * 86_400_000)
    assert post_event(client, old).get_json()["status"] == "processed"
