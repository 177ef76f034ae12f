"""The three extension recipes of docs/desenvolvimento.md ("Onde mexer"), each proven against the package."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Blueprint, current_app, jsonify

from fakes import waha_payloads as wp
from tests.conftest import make_settings, no_sleep, post_event
from whatsapp_webhook import EXTENSION_KEY, events
from whatsapp_webhook.app import create_app, shutdown
from whatsapp_webhook.events import Ignored, MessageFacts
from whatsapp_webhook.settings import Settings


@pytest.fixture
def built(tmp_path: Any, upstreams: Any):
    apps = []

    def build(settings: Settings | None = None, **options: Any):
        app = create_app(settings or make_settings(tmp_path), sleep=no_sleep, **options)
        apps.append(app)
        return app

    yield build
    for app in apps:
        shutdown(app)


def test_recipe_add_an_endpoint_as_a_blueprint(built) -> None:
    report = Blueprint("report", __name__)

    @report.get("/report/today")
    def today() -> Any:
        service = current_app.extensions[EXTENSION_KEY]  # the same service the webhook uses
        return jsonify(answered=service.status_document("ok")["stats"]["messages_processed"])

    client = built(blueprints=[report]).test_client()
    post_event(client, wp.text_message("WEBJS"))
    assert client.get("/report/today").get_json() == {"answered": 1}
    assert client.get("/health").status_code == 200  # ours still there


def test_recipe_change_the_ai_prompt(built, upstreams, tmp_path) -> None:
    env = {"OPENROUTER_API_KEY": "test-llm-key", "OPENROUTER_BASE_URL": "https://llm.test/api/v1",
           "WAHA_API_KEY": "test-waha-key", "WAHA_BASE_URL": "http://waha.test", "STATE_DB": str(tmp_path / "s.db"),
           "LOG_FILE": "", "TYPING_SIMULATION": "false", "DEBOUNCE_SECONDS": "0",
           "AI_SYSTEM_PROMPT": "Você é a atendente da Pizzaria Bella. Responda em até duas frases."}
    client = built(Settings.from_env(env)).test_client()
    post_event(client, wp.text_message("WEBJS", body="Tem borda recheada?"))
    system = upstreams.calls_to("llm")[0]["messages"][0]
    assert system == {"role": "system", "content": env["AI_SYSTEM_PROMPT"]}


def test_recipe_add_a_message_filter_with_its_own_ignore_reason(built, upstreams, monkeypatch) -> None:
    def ignore_thanks(facts: MessageFacts) -> Ignored | None:
        if facts.text.lower().rstrip("!. ") in ("obrigado", "obrigada", "valeu"):
            return Ignored("thanks_only", "a thank-you needs no answer")
        return None

    monkeypatch.setattr(events, "MESSAGE_FILTERS", [*events.MESSAGE_FILTERS, ignore_thanks])
    client = built().test_client()
    response = post_event(client, wp.text_message("NOWEB", body="Valeu!"))
    assert response.status_code == 200 and response.get_json()["reason"] == "thanks_only"
    assert post_event(client, wp.text_message("NOWEB", body="Qual o preço?")).get_json()["status"] == "processed"
    stats = client.get("/stats").get_json()["stats"]
    assert stats["ignored_by_reason"] == {"thanks_only": 1} and len(upstreams.sent_texts()) == 1
