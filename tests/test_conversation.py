"""Conversations: memory, debounce, long replies, human handoff, stop words, rate limits, loops (respx fakes)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx

from fakes import waha_payloads as wp
from tests.conftest import completion, post_event
from whatsapp_webhook import EXTENSION_KEY, admission, pipeline
from whatsapp_webhook.events import classify_event, parse_event
from whatsapp_webhook.formatting import markdown_to_whatsapp, split_message
from whatsapp_webhook.settings import (
    DEFAULT_FALLBACK_MESSAGE,
    DEFAULT_RATE_LIMIT_REPLY,
    DEFAULT_RESET_REPLY,
    DEFAULT_STOP_REPLY,
)


def customer(body: str, *, engine: str = "WEBJS", chat: str = wp.CUSTOMER_PN, ts: int | None = None) -> dict:
    return wp.text_message(engine, sender=chat, body=body, timestamp=ts)


def prompts(upstreams) -> list[list[dict]]:
    return [call["messages"] for call in upstreams.calls_to("llm")]


# --- memory ----------------------------------------------------------------------------------------

def test_the_llm_sees_the_earlier_turns_of_the_chat_and_only_of_that_chat(client, upstreams) -> None:
    post_event(client, customer("Meu nome é Ana"))
    post_event(client, customer("Oi", chat=wp.OTHER_PN))
    post_event(client, customer("Qual é o meu nome?"))
    last = prompts(upstreams)[-1]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "Meu nome é Ana" and last[2]["content"] == "Echo: Meu nome é Ana"
    assert "Oi" not in json.dumps(last)


def test_history_keeps_only_the_last_turns_within_the_budget(make_app, upstreams) -> None:
    client = make_app(history_turns=2, history_max_chars=60)
    client = client.test_client()
    for n in range(4):
        post_event(client, customer(f"pergunta número {n}"))
    last = prompts(upstreams)[-1]
    history = last[1:-1]
    assert history and sum(len(m["content"]) for m in history) <= 60
    assert history[0]["role"] == "user" and "pergunta número 2" in history[0]["content"]


def test_turns_that_were_never_sent_are_not_remembered(make_app, upstreams) -> None:
    client = make_app(reply_max_attempts=1).test_client()  # given up at once, so the chat moves on
    healthy = upstreams.send_text.side_effect
    upstreams.send_text.side_effect = lambda request: httpx.Response(400, json={"statusCode": 400})
    assert post_event(client, customer("Isto nunca foi respondido")).get_json()["status"] == "failed"
    upstreams.send_text.side_effect = healthy
    post_event(client, customer("Oi de novo"))
    assert "nunca foi respondido" not in json.dumps(prompts(upstreams)[-1][1:-1])


def test_a_fallback_is_not_remembered_as_an_answer(client, upstreams) -> None:
    upstreams.llm.side_effect = [httpx.Response(401, json={"error": {"code": 401}})] + [
        upstreams.llm.side_effect] * 0
    post_event(client, customer("primeira"))
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion("ok"))
    post_event(client, customer("segunda"))
    assert [m["role"] for m in prompts(upstreams)[-1]] == ["system", "user"]


def test_reset_command_clears_the_memory_and_confirms(client, upstreams) -> None:
    post_event(client, customer("Meu pedido é o 123"))
    response = post_event(client, customer("/reset"))
    assert response.get_json()["result"]["status"] == "command"
    assert upstreams.sent_texts()[-1]["text"] == DEFAULT_RESET_REPLY
    post_event(client, customer("Qual era o pedido?"))
    assert [m["role"] for m in prompts(upstreams)[-1]] == ["system", "user"]
    assert upstreams.llm.call_count == 2  # the command itself never reached the LLM


def test_a_context_length_error_is_retried_once_without_history(client, upstreams) -> None:
    post_event(client, customer("contexto antigo"))
    too_long = httpx.Response(400, json={"error": {"code": 400, "message": "This model's maximum context length is "
                                                   "8192 tokens", "metadata": {"error_type": "context_length_exceeded"}}})
    upstreams.llm.side_effect = [too_long, httpx.Response(200, json=completion("Resposta curta"))]
    response = post_event(client, customer("nova pergunta"))
    assert response.get_json()["result"]["status"] == "success"
    assert [m["role"] for m in prompts(upstreams)[-1]] == ["system", "user"]


# --- debounce --------------------------------------------------------------------------------------

def test_a_burst_is_answered_once_with_every_message_in_the_prompt(make_app, upstreams) -> None:
    app = make_app(debounce_seconds=0.4)
    base = int(time.time())
    burst = [customer(text, ts=base + n) for n, text in enumerate(["oi", "tudo bem?", "quero saber o preço"])]
    answers: list[dict] = []

    def deliver(envelope: dict) -> None:
        answers.append(post_event(app.test_client(), envelope).get_json())

    threads = []
    for envelope in burst:
        threads.append(threading.Thread(target=deliver, args=(envelope,)))
        threads[-1].start()
        time.sleep(0.1)  # typed in quick succession
    for thread in threads:
        thread.join()
    assert upstreams.llm.call_count == 1
    assert prompts(upstreams)[0][-1]["content"] == "oi\ntudo bem?\nquero saber o preço"
    assert [t["text"] for t in upstreams.sent_texts()] == ["Echo: oi\ntudo bem?\nquero saber o preço"]
    assert sorted(a["result"]["status"] for a in answers) == ["merged", "merged", "success"]
    counts = app.test_client().get("/stats").get_json()["stats"]
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_in_progress"]) == (3, 3, 0)


def test_a_lone_message_is_answered_when_its_window_ends_not_at_the_next_poll(make_app, upstreams,
                                                                            monkeypatch) -> None:
    """The dispatcher is woken when the window closes; with polls an hour apart the reply still comes."""
    monkeypatch.setattr("whatsapp_webhook.worker.POLL_SECONDS", 3600.0)
    client = make_app(debounce_seconds=0.3).test_client()
    response = post_event(client, customer("oi, vocês abrem amanhã?"))
    assert response.get_json()["result"]["status"] == "success"
    assert [t["text"] for t in upstreams.sent_texts()] == ["Echo: oi, vocês abrem amanhã?"]


def test_debounce_zero_answers_each_message(client, upstreams) -> None:
    for text in ("um", "dois"):
        post_event(client, customer(text))
    assert upstreams.llm.call_count == 2


# --- long replies ----------------------------------------------------------------------------------

LONG_MARKDOWN = ("## Horários\n\n**Segunda a sexta:** das 9h às 18h. " + "Atendemos com hora marcada. " * 30 + "\n\n"
                 "Mais detalhes em [nosso site](https://example.com/horarios_loja).\n\n" + "Fim da resposta. " * 20)


def test_a_long_markdown_reply_arrives_in_whatsapp_format_and_in_ordered_parts(make_app, upstreams) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion(LONG_MARKDOWN))
    client = make_app(max_message_chars=500).test_client()
    post_event(client, customer("Qual o horário?"))
    parts = [t["text"] for t in upstreams.sent_texts()]
    assert len(parts) > 1 and all(len(p) <= 500 for p in parts)
    assert parts[0].startswith("*Horários*") and "*Segunda a sexta:*" in "\n".join(parts)
    assert "**" not in "\n".join(parts) and "nosso site (https://example.com/horarios_loja)" in "\n".join(parts)
    words = " ".join(parts).split()
    assert words == markdown_to_whatsapp(LONG_MARKDOWN).split()  # nothing lost, nothing cut mid-word


def test_a_reply_interrupted_between_parts_resumes_after_the_last_part_sent(make_app, upstreams) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion(LONG_MARKDOWN))
    healthy = upstreams.send_text.side_effect
    calls = {"n": 0}

    def fail_the_second(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 2:
            return httpx.Response(422, json={"error": "Session status is not as expected"})
        return healthy(request)

    upstreams.send_text.side_effect = fail_the_second
    client = make_app(max_message_chars=500, waha_send_attempts=1).test_client()
    envelope = customer("Qual o horário?")
    assert post_event(client, envelope).status_code == 503
    post_event(client, envelope)  # WAHA redelivers
    parts = [t["text"] for t in upstreams.sent_texts()]
    assert len(parts) == len(set(parts)) and len(parts) == len(split_message(
        markdown_to_whatsapp(LONG_MARKDOWN), 500))
    assert upstreams.llm.call_count == 1


def test_a_long_reply_is_formatted_and_split_off_the_event_loop(make_app, upstreams, monkeypatch) -> None:
    """A long hostile reply is CPU work: on the loop's thread it would freeze every other chat of the worker.
    (A short one is cheaper to format on the loop than to hand to a thread.)"""
    assert len(LONG_MARKDOWN) > pipeline.INLINE_TEXT_CHARS
    on_loop: list[tuple[str, bool]] = []

    def watched(name, function):
        def call(*args):
            try:
                asyncio.get_running_loop()
                on_loop.append((name, True))
            except RuntimeError:  # no loop in this thread: a worker thread
                on_loop.append((name, False))
            return function(*args)
        return call

    monkeypatch.setattr(pipeline, "markdown_to_whatsapp", watched("markdown_to_whatsapp", markdown_to_whatsapp))
    monkeypatch.setattr(pipeline, "split_message", watched("split_message", split_message))
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion(LONG_MARKDOWN))
    healthy = upstreams.send_text.side_effect
    calls = {"n": 0}

    def fail_the_second(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(422, json={"error": "busy"}) if calls["n"] == 2 else healthy(request)

    upstreams.send_text.side_effect = fail_the_second
    client = make_app(max_message_chars=500, waha_send_attempts=1).test_client()
    envelope = customer("Qual o horário?")
    post_event(client, envelope)
    post_event(client, envelope)  # the redelivery resumes the written reply: split again, not formatted again
    assert [name for name, _ in on_loop] == ["markdown_to_whatsapp", "split_message", "split_message"]
    assert not any(loop for _, loop in on_loop)


# --- human handoff and opt-out ---------------------------------------------------------------------

def test_a_person_answering_from_the_phone_pauses_the_bot_in_that_chat(client, upstreams) -> None:
    post_event(client, customer("Quero falar com alguém"))
    human = wp.own_app_message_any("NOWEB", chat=wp.CUSTOMER_PN, body="Oi, aqui é a Ana, posso ajudar")
    answer = post_event(client, human).get_json()
    assert answer["reason"] == "from_me" and "paused" in answer["detail"]
    response = post_event(client, customer("Obrigado Ana!"))
    assert response.get_json()["result"] == {"status": "skipped", "from_number": wp.CUSTOMER_PN,
                                             "response_sent": False, "message_id": None}
    assert post_event(client, customer("Outro cliente", chat=wp.OTHER_PN)).get_json()["status"] == "processed"
    stats = client.get("/stats").get_json()["stats"]
    assert stats["chats_paused"] == {"handoff": 1} and stats["messages_skipped"] == 1
    assert len(upstreams.sent_texts()) == 2


def test_the_bots_own_echo_is_not_taken_for_a_person(client, upstreams) -> None:
    post_event(client, customer("Oi"))
    echo = wp.own_app_message_any("NOWEB", chat=wp.CUSTOMER_PN, body="Echo: Oi")  # NOWEB may say source=app
    assert post_event(client, echo).get_json()["detail"] == "the bot's own reply"
    assert post_event(client, customer("Tudo bem?")).get_json()["result"]["status"] == "success"


def test_operator_commands_pause_and_resume_the_bot(client, upstreams) -> None:
    operator = wp.own_app_message_any("GOWS", chat=wp.CUSTOMER_PN, body="/bot off")
    post_event(client, operator)
    assert post_event(client, customer("alô?")).get_json()["result"]["status"] == "skipped"
    post_event(client, wp.own_app_message_any("GOWS", chat=wp.CUSTOMER_PN, body="/bot on"))
    assert post_event(client, customer("alô de novo")).get_json()["result"]["status"] == "success"


def test_stop_and_start_words(client, upstreams) -> None:
    assert post_event(client, customer("parar")).get_json()["result"]["status"] == "command"
    assert upstreams.sent_texts()[-1]["text"] == DEFAULT_STOP_REPLY
    assert post_event(client, customer("ainda está aí?")).get_json()["result"]["status"] == "skipped"
    assert post_event(client, customer("VOLTAR")).get_json()["result"]["status"] == "command"
    assert post_event(client, customer("e agora?")).get_json()["result"]["status"] == "success"
    assert upstreams.llm.call_count == 1


# --- loops and spam --------------------------------------------------------------------------------

def test_a_spammer_is_rate_limited_with_one_polite_notice(make_app, upstreams) -> None:
    client = make_app(rate_limit_per_minute=3).test_client()
    statuses = [post_event(client, customer(f"mensagem {n}")).get_json()["result"]["status"] for n in range(6)]
    assert statuses == ["success", "success", "success", "notice", "skipped", "skipped"]  # one notice only
    assert [t["text"] for t in upstreams.sent_texts()][-1] == DEFAULT_RATE_LIMIT_REPLY
    assert upstreams.llm.call_count == 3 and len(upstreams.sent_texts()) == 4


def test_the_daily_cap(make_app, upstreams) -> None:
    client = make_app(daily_message_limit=2, rate_limit_per_minute=100).test_client()
    statuses = [post_event(client, customer(f"pedido {n}")).get_json()["result"]["status"] for n in range(4)]
    assert statuses == ["success", "success", "notice", "skipped"]


def test_a_message_the_claim_cannot_be_told_how_to_admit_is_still_answered_and_other_chats_too(
        make_app, upstreams, monkeypatch, caplog) -> None:
    """A bug deciding what a claim should admit must not fail every claim (no chat would be answered again)."""
    asks = admission.ChatAdmission.request

    def broken_for_one_chat(self, claimed):
        if claimed.message.chat_id.startswith(wp.OTHER_PN):
            raise KeyError("a payload shape nobody expected")
        return asks(self, claimed)

    monkeypatch.setattr(admission.ChatAdmission, "request", broken_for_one_chat)
    client = make_app(rate_limit_per_minute=1).test_client()
    monkeypatch.setattr(logging.getLogger("whatsapp_webhook"), "propagate", True)  # the app turned it off
    assert post_event(client, customer("oi", chat=wp.OTHER_PN)).get_json()["result"]["status"] == "success"
    assert post_event(client, customer("oi")).get_json()["result"]["status"] == "success"
    # Admitted when its reply was composed instead: its limits still count.
    assert post_event(client, customer("de novo", chat=wp.OTHER_PN)).get_json()["result"]["status"] == "notice"
    assert "could not tell the claim what to admit" in caplog.text


def test_a_bot_repeating_itself_is_detected_as_a_loop_and_the_chat_paused(client, upstreams) -> None:
    statuses = [post_event(client, customer("Olá! Sou um robô. Como posso ajudar?")).get_json()["result"]["status"]
                for _ in range(6)]
    assert statuses == ["success"] * 4 + ["skipped"] * 2
    assert client.get("/stats").get_json()["stats"]["chats_paused"] == {"loop": 1}


def test_a_person_saying_the_same_short_thing_is_not_a_loop(client, upstreams) -> None:
    for text in ("oi", "oi", "oi", "obrigado", "Echo: oi"):
        assert post_event(client, customer(text)).get_json()["result"]["status"] == "success"


def test_another_bot_echoing_our_long_reply_is_a_loop(client, upstreams) -> None:
    question = "Vocês têm o modelo azul em estoque para entrega amanhã?"
    post_event(client, customer(question))
    echo_bot = customer(f"Echo: {question}")  # the other side repeats exactly what we said
    assert post_event(client, echo_bot).get_json()["result"]["status"] == "skipped"
    assert upstreams.llm.call_count == 1


def test_a_human_reply_does_not_shorten_an_operator_pause(client, upstreams) -> None:
    post_event(client, wp.own_app_message_any("WEBJS", chat=wp.CUSTOMER_PN, body="/bot off"))
    post_event(client, wp.own_app_message_any("WEBJS", chat=wp.CUSTOMER_PN, body="Oi, já te respondo"))
    assert client.get("/stats").get_json()["stats"]["chats_paused"] == {"operator": 1}


def test_posting_a_status_from_the_phone_pauses_nothing(client, upstreams) -> None:
    status = wp.own_app_message_any("NOWEB", chat="status@broadcast", body="Promoção de sábado!")
    assert post_event(client, status).get_json()["reason"] == "status_broadcast"
    assert client.get("/stats").get_json()["stats"]["chats_paused"] == {}


def test_an_llm_answer_that_formats_to_nothing_gets_the_fallback(client, upstreams) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion("---"))
    assert post_event(client, customer("oi")).get_json()["result"]["status"] == "fallback"
    assert upstreams.sent_texts()[0]["text"] == DEFAULT_FALLBACK_MESSAGE


def test_a_burst_counts_once_against_the_rate_limit(make_app, upstreams) -> None:
    app = make_app(debounce_seconds=0.3, rate_limit_per_minute=2)
    base = int(time.time())
    threads = [threading.Thread(target=post_event, args=(app.test_client(), customer(f"linha {n}", ts=base + n)))
               for n in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert upstreams.llm.call_count == 1 and len(upstreams.sent_texts()) == 1


def test_a_stop_word_while_a_person_handles_the_chat_is_recorded_silently(client, upstreams) -> None:
    post_event(client, wp.own_app_message_any("WEBJS", chat=wp.CUSTOMER_PN, body="Olá, sou o João"))
    assert post_event(client, customer("parar")).get_json()["result"]["status"] == "skipped"
    assert upstreams.sent_texts() == []
    assert client.get("/stats").get_json()["stats"]["chats_opted_out"] == 1


def test_a_fallback_already_sent_before_a_crash_is_not_followed_by_another_answer(make_app, upstreams) -> None:
    app = make_app()
    store = app.extensions[EXTENSION_KEY].store
    envelope = customer("Está aberto?")
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=False)
    store.accept(message)
    # A worker claimed it, the LLM failed, the fallback went out, then the worker died before recording it.
    (claimed,) = store.claim_due("dead-worker", limit=1, lease_seconds=0.01)
    store.begin_send(message.dedupe_key, "dead-worker", parts=[DEFAULT_FALLBACK_MESSAGE],
                     reply=(DEFAULT_FALLBACK_MESSAGE, "fallback"))
    upstreams.delivered.append({"session": "default", "chatId": message.chat_id,
                                "text": DEFAULT_FALLBACK_MESSAGE})
    time.sleep(0.05)
    response = post_event(app.test_client(), envelope)  # WAHA redelivers; a live worker takes over
    deadline = time.monotonic() + 5
    while store.entry(message.dedupe_key).status != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.entry(message.dedupe_key).outcome == "fallback" and claimed.attempts == 1
    assert [t["text"] for t in upstreams.sent_texts()] == [DEFAULT_FALLBACK_MESSAGE]
    assert upstreams.llm.call_count == 0 and response.status_code in (200, 202)
