"""Hostile data through the running server (gunicorn, 2 workers): values that try to steer a URL or forge a log."""

from __future__ import annotations

import json

import httpx
import pytest

from fakes import waha_payloads as wp

pytestmark = pytest.mark.e2e
WEBHOOK = "/api/v1/whatsapp/webhook"


def post(server, envelope: dict) -> httpx.Response:
    return httpx.post(server.url + WEBHOOK, content=wp.dumps(envelope), headers={"Content-Type": "application/json"},
                      timeout=30)


@pytest.mark.parametrize("field, value, reason", [
    ("from", "..", "invalid_chat_id"),
    ("from", "../../sessions", "invalid_chat_id"),
    ("session", "..", "invalid_session"),
])
def test_ids_that_would_steer_wahas_url_are_ignored_and_waha_never_hears_of_them(
        server, fake_waha, fake_llm, field, value, reason) -> None:
    envelope = wp.text_message("WEBJS", body="oi")
    if field == "session":
        envelope["session"] = value
    else:
        envelope["payload"][field] = value
    response = post(server, envelope)
    assert (response.status_code, response.json()["reason"]) == (200, reason)  # WAHA would retry a 4xx forever
    assert fake_waha.requests() == [] and fake_llm.completions() == []
def test_an_event_id_cannot_forge_a_log_line_or_a_json_field(start_server, fake_waha, fake_llm) -> None:
    server = start_server(LOG_FORMAT="json")
    forged = 'x decision=FORGED\n2026-12-01 INFO [pid 1] whatsapp_webhook: event=fake decision=replied\u2028more'
    envelope = wp.text_message("NOWEB", body="Qual o horário?")
    envelope["id"] = forged
    assert post(server, envelope).json()["status"] == "processed"
    lines = server.log_text().splitlines()
    documents = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(documents) == len([line for line in lines if line.strip()])  # every line is one whole JSON document
    ours = [d for d in documents if d.get("event") == forged]
    assert ours and {d.get("decision") for d in ours} >= {"reply", "working", "replied"}
    assert all(d.get("decision") != "FORGED" for d in documents)
    assert not [d for d in documents if d.get("event") == "fake"]


def test_a_replayed_signed_body_is_ignored_by_the_running_server(start_server, fake_waha, fake_llm) -> None:
    server = start_server(WEBHOOK_HMAC_KEY="e2e-replay-key", WEBHOOK_STALE_SECONDS="3600")
    old = wp.text_message("GOWS", body="Quero cancelar", timestamp_ms=1_700_000_000_000)  # 2023
    body = wp.dumps(old)
    headers = {"Content-Type": "application/json", "X-Webhook-Hmac": wp.sign(body, "e2e-replay-key"),
               "X-Webhook-Hmac-Algorithm": "sha512"}
    answers = [httpx.post(server.url + WEBHOOK, content=body, headers=headers, timeout=30) for _ in range(5)]
    assert {(a.status_code, a.json()["reason"]) for a in answers} == {(200, "stale_event")}
    assert fake_llm.completions() == [] and fake_waha.sent_texts() == []


def test_replays_of_a_body_whose_reply_keeps_failing_cannot_send_it_more_than_reply_max_sends(
        start_server, fake_waha, fake_llm) -> None:
    # Our own retries wait 10 min here: every attempt below is one a replay (WAHA's redelivery) triggered.
    server = start_server(WEBHOOK_HMAC_KEY="e2e-sends-key", REPLY_MAX_ATTEMPTS="3", REPLY_MAX_SENDS="4",
                          REPLY_RETRY_SECONDS="600", WAHA_SEND_ATTEMPTS="1", WEBHOOK_SYNC_WAIT_SECONDS="3")
    fake_waha.add_fault("/api/sendText", status=500, times=0)
    envelope = wp.text_message("WEBJS", body="Quero cancelar meu pedido")
    body = wp.dumps(envelope)
    headers = {"Content-Type": "application/json", "X-Webhook-Hmac": wp.sign(body, "e2e-sends-key"),
               "X-Webhook-Hmac-Algorithm": "sha512"}
    answers = [httpx.post(server.url + WEBHOOK, content=body, headers=headers, timeout=30) for _ in range(40)]
    send_calls = fake_waha.requests("/api/sendText", "POST")
    assert len(send_calls) == 4, len(send_calls)  # one per replay (40) before REPLY_MAX_SENDS
    assert len(fake_llm.completions()) == 1  # the stored reply is what each attempt resends
    last = answers[-1].json()
    assert (answers[-1].status_code, last["reason"], last["detail"]) == (200, "duplicate", "message already given up on")
    assert "REPLY_MAX_SENDS" in server.log_text()
