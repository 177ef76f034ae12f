"""Hostile data through the running server (gunicorn, 2 workers): values that try to steer a URL or forge a log."""

from __future__ import annotations

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
