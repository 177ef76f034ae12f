"""The bot knows the business, end to end: real gunicorn (2 workers) with a SESSIONS_FILE for four WhatsApp
numbers configured differently, the fake WAHA serving those sessions and the fake OpenRouter logging each prompt.

Each test prints what the customer saw (run with -s to read the transcripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from fakes import FakeOpenRouter, FakeWaha
from fakes import waha_payloads as wp
from fakes.gunicorn_server import GunicornServer
from tests import postgres
from tests.e2e.conftest import E2E_ENV, LLM_KEY, WAHA_KEY
from tests.e2e.test_gunicorn import deliver, stats

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DAY = ("seg", "ter", "qua", "qui", "sex", "sab", "dom")


def closed_now() -> str:
    tomorrow = datetime.now(ZoneInfo("America/Sao_Paulo")) + timedelta(days=1)
    return f"{DAY[tomorrow.weekday()]} 08:00-09:00"


def sessions_toml() -> str:
    return f"""
[default]
ai_system_prompt = "Você é a atendente da Padaria Pão Quente."
ai_knowledge_file = "padaria.md"

[loja2]
ai_system_prompt = "Você é o assistente da Confeitaria Doce Lar."
ai_knowledge_file = "confeitaria/"
openrouter_model = "google/gemini-3.5-flash"
openrouter_fallback_models = []

[loja3]
business_hours = "{closed_now()}"
out_of_hours_mode = "notice"
out_of_hours_notice = "Estamos fechados ({{hours}}). Voltamos {{next_open}}."

[loja4]
llm_daily_budget_usd = 0.00001
fallback_message = "Hoje não consigo mais responder; a equipe retorna amanhã."
"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeWaha, FakeOpenRouter]]:
    with FakeWaha(api_key=WAHA_KEY, engine="WEBJS", other_sessions=("loja2", "loja3", "loja4")) as waha, \
            FakeOpenRouter(api_key=LLM_KEY) as llm:
        yield waha, llm


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def business(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             fakes: tuple[FakeWaha, FakeOpenRouter]) -> Iterator[Any]:
    """The server, once on an SQLite file and once on a PostgreSQL database of its own (tests/postgres.py)."""
    waha, llm = fakes
    folder = tmp_path_factory.mktemp("business")
    (folder / "padaria.md").write_text("Pão francês: R$ 0,90 a unidade.", encoding="utf-8")
    (folder / "confeitaria").mkdir()
    (folder / "confeitaria" / "bolos.md").write_text("Bolo de cenoura: R$ 38,00.", encoding="utf-8")
    (folder / "sessions.toml").write_text(sessions_toml(), encoding="utf-8")
    env = {**E2E_ENV, "WAHA_BASE_URL": waha.url, "WAHA_API_KEY": WAHA_KEY,
           "OPENROUTER_BASE_URL": llm.url + "/api/v1", "OPENROUTER_API_KEY": LLM_KEY,
           "SESSIONS_FILE": str(folder / "sessions.toml")}
    if request.param == "postgresql":
        env["STATE_DB"] = postgres.fresh_database()
    server = GunicornServer(folder / "server", env).start()
    yield server, folder
    server.stop()


@pytest.fixture(autouse=True)
def clean(fakes: tuple[FakeWaha, FakeOpenRouter]) -> None:
    for fake in fakes:
        fake.reset()


def say(server: GunicornServer, session: str, chat: str, text: str) -> dict[str, Any]:
    response = deliver(server, wp.text_message("WEBJS", sender=chat, body=text, session=session))
    assert response.status_code == 200, response.text
    return dict(response.json())


def transcript(waha: FakeWaha, session: str, chat: str, said: list[str]) -> list[str]:
    received = [t["text"] for t in waha.delivered_texts() if t["chatId"] == chat and t["session"] == session]
    lines = [f"cliente> {text}" for text in said] + [f"bot>     {text}" for text in received]
    print(f"\n--- transcript {session} {chat} ---\n" + "\n".join(lines))
    return received


def test_each_number_sends_its_own_prompt_and_knowledge_to_the_llm(business, fakes) -> None:
    (server, _), (waha, llm) = business, fakes
    say(server, "default", "5521933330001@c.us", "Quanto custa o pão?")
    say(server, "loja2", "5521933330002@c.us", "Quanto custa o bolo?")
    padaria, confeitaria = llm.completions()
    print("\n--- the fake OpenRouter's log: each number's system prompt ---")
    for body in (padaria, confeitaria):
        print(f"model={body['model']}\n{body['messages'][0]['content']}\n")
    assert padaria["messages"][0]["content"].startswith("Você é a atendente da Padaria Pão Quente.")
    assert "Pão francês: R$ 0,90 a unidade." in padaria["messages"][0]["content"]
    assert "Bolo" not in padaria["messages"][0]["content"]
    assert confeitaria["messages"][0]["content"].startswith("Você é o assistente da Confeitaria Doce Lar.")
    assert "Bolo de cenoura: R$ 38,00." in confeitaria["messages"][0]["content"]
    assert (padaria["model"], confeitaria["model"]) == ("google/gemini-3.1-flash-lite", "google/gemini-3.5-flash")
    assert transcript(waha, "loja2", "5521933330002@c.us", ["Quanto custa o bolo?"]) == ["Echo: Quanto custa o bolo?"]


def test_a_knowledge_file_edited_while_running_takes_effect_on_the_next_message(business, fakes) -> None:
    (server, folder), (_, llm) = business, fakes
    say(server, "default", "5521933330003@c.us", "Preço do pão?")
    assert "R$ 0,90" in llm.completions()[-1]["messages"][0]["content"]
    (folder / "padaria.md").write_text("Pão francês: R$ 1,10 a unidade (preço novo).", encoding="utf-8")
    time.sleep(1.2)  # each worker looks at the file at most once a second
    for n in range(4):  # both workers, whichever takes the message
        say(server, "default", f"5521933330{10 + n}@c.us", "E hoje?")
    for body in llm.completions()[-4:]:
        assert "R$ 1,10 a unidade (preço novo)" in body["messages"][0]["content"]
        assert "R$ 0,90" not in body["messages"][0]["content"]


def test_notice_mode_out_of_hours_sends_one_notice_and_makes_no_llm_call(business, fakes) -> None:
    (server, _), (waha, llm) = business, fakes
    chat, said = "5521933330020@c.us", ["Oi, vocês estão abertos?", "Alô?", "Tem alguém aí?"]
    results = [say(server, "loja3", chat, text)["result"]["status"] for text in said]
    assert results == ["notice", "skipped", "skipped"]
    received = transcript(waha, "loja3", chat, said)
    assert received == [f"Estamos fechados ({closed_now()}). Voltamos amanhã às 08:00."]
    assert llm.completions() == []


def test_the_budget_cap_stops_llm_calls_once_the_fake_reports_enough_cost(business, fakes) -> None:
    (server, _), (waha, llm) = business, fakes
    chat, said = "5521933330030@c.us", ["Primeira pergunta", "Segunda pergunta", "Terceira"]
    results = [say(server, "loja4", chat, text)["result"]["status"] for text in said]
    received = transcript(waha, "loja4", chat, said)
    # The fake charges about 1e-6 USD per token: the first reply alone passes loja4's 0.00001 USD.
    assert results == ["success", "fallback", "fallback"]
    assert len(llm.completions()) == 1
    assert received[1:] == ["Hoje não consigo mais responder; a equipe retorna amanhã."] * 2
    document = httpx.get(server.url + "/health", timeout=5).json()
    assert document["status"] == "degraded"
    assert "[loja4] llm_daily_budget_usd=1e-05 USD reached today" in document["checks"]["llm"]["reason"]
    by_session = stats(server)["by_session"]
    assert by_session["loja4"]["messages"] == {"success": 1, "fallback": 2}
    assert by_session["loja4"]["llm_cost_usd"] > 0.00001
    assert server.log_text().count("decision=budget_reached") == 1


def test_export_then_forget_leaves_no_trace_of_the_chat(business, fakes) -> None:
    (server, _), _ = business, fakes
    chat, secret = "5521933330040@c.us", "Meu CPF é 111.222.333-44"
    say(server, "default", chat, secret)
    say(server, "default", chat, "Obrigado")

    def command(*args: str) -> str:
        env = {**server.env, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, str(ROOT / "whatsapp_webhook_server.py"), *args], env=env,
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    exported = json.loads(command("--export-chat", chat))
    assert [m["message"]["text"] for m in exported["messages"]] == [secret, "Obrigado"]
    assert len(exported["history"]) == 4
    forgotten = command("--forget-chat", chat)
    print(f"\n$ python whatsapp_webhook_server.py --forget-chat {chat}\n{forgotten}")
    assert "deleted 4 row(s) from history" in forgotten and "kept 2 answered message key(s)" in forgotten
    after = json.loads(command("--export-chat", chat))
    assert (after["messages"], after["history"], after["chat_state"], after["sent"]) == ([], [], None, [])
    if not server.env["STATE_DB"].startswith("postgresql://"):  # SQLite: not in the file's bytes either
        files = [Path(server.state_db + suffix) for suffix in ("", "-wal")]
        on_disk = b"".join(path.read_bytes() for path in files if path.exists())
        assert os.path.exists(server.state_db) and b"111.222.333-44" not in on_disk
        assert chat.split("@")[0].encode() not in on_disk
