"""What a customer sees, end to end through gunicorn and the fakes: bursts, long replies, handoff, spam.

Each test prints the conversation as the fake WAHA saw it (run with -s to read the transcripts).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from fakes import waha_payloads as wp
from fakes.fake_openrouter import echo
from tests.e2e.test_gunicorn import deliver, stats

pytestmark = pytest.mark.e2e

# The conversation rules at their shipped defaults, except where a test says otherwise.
CONVERSATION_ENV = {"DEBOUNCE_SECONDS": "3", "RATE_LIMIT_PER_MINUTE": "10", "LOOP_REPEATS": "3",
                    "DAILY_MESSAGE_LIMIT": "200", "WEBHOOK_SYNC_WAIT_SECONDS": "10"}


def transcript(fake_waha, fake_llm, chat: str, sent: list[str]) -> list[str]:
    """The customer's side of the chat: what they wrote, then every text the bot sent to them."""
    lines = [f"cliente> {text}" for text in sent]
    lines += [f"bot>     {t['text']}" for t in fake_waha.delivered_texts() if t["chatId"] == chat]
    print(f"\n--- transcript {chat} ---\n" + "\n".join(lines))
    return [t["text"] for t in fake_waha.delivered_texts() if t["chatId"] == chat]


def test_a_burst_typed_in_seconds_gets_one_answer_with_everything_in_the_prompt(start_server, fake_waha,
                                                                                fake_llm) -> None:
    server = start_server(**CONVERSATION_ENV)
    chat, base = "5521911110001@c.us", int(time.time())
    burst = ["oi", "tudo bem?", "quero saber o preço do plano anual"]
    envelopes = [wp.text_message("NOWEB", sender=chat, body=text, timestamp=base + n) for n, text in enumerate(burst)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = []
        for envelope in envelopes:  # a second apart at most, landing on both workers
            futures.append(pool.submit(deliver, server, envelope))
            time.sleep(0.5)
        answers = [f.result().json() for f in futures]
    received = transcript(fake_waha, fake_llm, chat, burst)
    assert received == ["Echo: oi\ntudo bem?\nquero saber o preço do plano anual"]
    assert len(fake_llm.completions()) == 1
    assert sorted(a["result"]["status"] for a in answers) == ["merged", "merged", "success"]
    counts = stats(server)
    assert (counts["messages_received"], counts["messages_processed"]) == (3, 3)


def test_memory_is_shared_by_both_workers(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**CONVERSATION_ENV, "DEBOUNCE_SECONDS": "0"})
    chat = "5521911110002@c.us"
    for text in ("Meu nome é Carla", "Qual é o meu nome?", "Obrigada"):
        assert deliver(server, wp.text_message("GOWS", sender=chat, body=text)).status_code == 200
    last_prompt = fake_llm.completions()[-1]["messages"]
    assert [m["content"] for m in last_prompt[1:]] == [
        "Meu nome é Carla", "Echo: Meu nome é Carla", "Qual é o meu nome?", "Echo: Qual é o meu nome?", "Obrigada"]
    assert deliver(server, wp.text_message("GOWS", sender=chat, body="/reset")).json()["result"]["status"] == "command"
    deliver(server, wp.text_message("GOWS", sender=chat, body="Oi de novo"))
    assert [m["role"] for m in fake_llm.completions()[-1]["messages"]] == ["system", "user"]


def test_a_long_reply_arrives_in_parts_in_whatsapp_format(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**CONVERSATION_ENV, "DEBOUNCE_SECONDS": "0", "MAX_MESSAGE_CHARS": "400"})
    answer = ("## Planos\n\n**Mensal:** R$ 49. " + "Inclui suporte por e-mail e chat em horário comercial. " * 6
              + "\n\n**Anual:** R$ 490. " + "Dois meses grátis, suporte prioritário e migração assistida. " * 6
              + "\n\nDetalhes em [nossa página](https://example.com/planos).")
    fake_llm.reply = lambda text: answer
    chat = "5521911110003@c.us"
    try:
        deliver(server, wp.text_message("WEBJS", sender=chat, body="Quais são os planos?"))
    finally:
        fake_llm.reply = echo
    parts = transcript(fake_waha, fake_llm, chat, ["Quais são os planos?"])
    assert len(parts) >= 3 and all(len(p) <= 400 for p in parts)
    assert parts[0].startswith("*Planos*\n\n*Mensal:* R$ 49.") and parts[1].startswith("*Anual:* R$ 490.")
    assert parts[-1].endswith("nossa página (https://example.com/planos).")
    assert "**" not in "\n".join(parts) and "##" not in "\n".join(parts)


def test_a_person_takes_over_and_the_operator_hands_back(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**CONVERSATION_ENV, "DEBOUNCE_SECONDS": "0"})
    chat = "5521911110004@c.us"
    said: list[str] = []

    def customer(text: str) -> dict[str, Any]:
        said.append(text)
        return deliver(server, wp.text_message("NOWEB", sender=chat, body=text)).json()

    def attendant(text: str) -> dict[str, Any]:
        said.append(f"(atendente pelo celular) {text}")
        return deliver(server, wp.own_app_message_any("NOWEB", chat=chat, body=text)).json()

    assert customer("Quero falar com uma pessoa")["result"]["status"] == "success"
    # The bot's own reply comes back as message.any (NOWEB may even say source=app): not a person.
    echo_back = wp.own_app_message_any("NOWEB", chat=chat, body="Echo: Quero falar com uma pessoa")
    assert deliver(server, echo_back).json()["detail"] == "the bot's own reply"
    assert "bot paused" in attendant("Oi! Sou a Marina, vou te ajudar")["detail"]
    assert customer("Obrigado Marina")["result"]["status"] == "skipped"
    assert stats(server)["chats_paused"] == {"handoff": 1}
    assert "resumed" in attendant("/bot on")["detail"]
    assert customer("Pode me mandar o boleto?")["result"]["status"] == "success"
    received = transcript(fake_waha, fake_llm, chat, said)
    assert received == ["Echo: Quero falar com uma pessoa", "Echo: Pode me mandar o boleto?"]
    assert "decision=bot_paused reason=handoff" in server.log_text()


def test_a_spammer_is_rate_limited_with_one_polite_notice(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**CONVERSATION_ENV, "DEBOUNCE_SECONDS": "0", "RATE_LIMIT_PER_MINUTE": "3"})
    chat = "5521911110005@c.us"
    texts = [f"promoção imperdível número {n}" for n in range(8)]
    statuses = [deliver(server, wp.text_message("GOWS", sender=chat, body=t)).json()["result"]["status"]
                for t in texts]
    assert statuses == ["success"] * 3 + ["notice"] + ["skipped"] * 4
    received = transcript(fake_waha, fake_llm, chat, texts)
    assert len(received) == 4 and received[-1].startswith("Recebi muitas mensagens")
    assert len(fake_llm.completions()) == 3
    counts = stats(server)
    assert counts["messages_received"] == counts["messages_processed"] + counts["messages_skipped"] == 8


def test_a_customer_can_stop_the_bot_and_bring_it_back(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**CONVERSATION_ENV, "DEBOUNCE_SECONDS": "0"})
    chat = "5521911110006@c.us"
    texts = ["PARAR", "ainda tem alguém aí?", "voltar", "qual o horário?"]
    statuses = [deliver(server, wp.text_message("WEBJS", sender=chat, body=t)).json()["result"]["status"]
                for t in texts]
    assert statuses == ["command", "skipped", "command", "success"]
    received = transcript(fake_waha, fake_llm, chat, texts)
    assert received[0].startswith("Tudo bem, não vou mais responder") and received[-1] == "Echo: qual o horário?"
    assert stats(server)["chats_opted_out"] == 0
