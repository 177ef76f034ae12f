"""The bot knows the business, seen from WAHA and the LLM (respx fakes): opening hours in the prompt, the
out-of-hours modes, the knowledge files in the prompt (stable part first) and their reload, cached tokens."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from fakes import waha_payloads as wp
from tests.conftest import completion, post_event
from whatsapp_webhook import EXTENSION_KEY, knowledge
from whatsapp_webhook.hours import WEEKDAY_PT
from whatsapp_webhook.knowledge import KNOWLEDGE_INSTRUCTION, KnowledgeBase, read_knowledge
from whatsapp_webhook.settings import Settings, SettingsError

DAY = ("seg", "ter", "qua", "qui", "sex", "sab", "dom")


def closed_now() -> str:
    """Hours that are surely closed right now: tomorrow morning only (in São Paulo)."""
    tomorrow = datetime.now(ZoneInfo("America/Sao_Paulo")) + timedelta(days=1)
    return f"{DAY[tomorrow.weekday()]} 08:00-09:00"


def customer(body: str, *, chat: str = wp.CUSTOMER_PN) -> dict[str, Any]:
    return wp.text_message("WEBJS", sender=chat, body=body)


def prompts(upstreams: Any) -> list[list[dict[str, str]]]:
    return [call["messages"] for call in upstreams.calls_to("llm")]


def status_of(response: Any) -> str:
    return str(response.get_json()["result"]["status"])


# --- opening hours ---------------------------------------------------------------------------------

def test_notice_mode_sends_one_notice_per_closed_period_and_never_calls_the_llm(make_app, upstreams) -> None:
    client = make_app(business_hours=closed_now(), out_of_hours_mode="notice",
                      out_of_hours_notice="Fechados agora ({hours}); voltamos {next_open}.").test_client()
    assert status_of(post_event(client, customer("Oi, vocês entregam hoje?"))) == "notice"
    assert status_of(post_event(client, customer("Alô?"))) == "skipped"
    assert status_of(post_event(client, customer("Oi", chat=wp.OTHER_PN))) == "notice"  # another chat: its own
    assert upstreams.llm.call_count == 0
    texts = [sent["text"] for sent in upstreams.sent_texts()]
    assert texts == [f"Fechados agora ({closed_now()}); voltamos amanhã às 08:00."] * 2
    assert [sent["chatId"] for sent in upstreams.sent_texts()] == [wp.CUSTOMER_PN, wp.OTHER_PN]


def test_silent_mode_answers_nothing_out_of_hours(make_app, upstreams) -> None:
    client = make_app(business_hours=closed_now(), out_of_hours_mode="silent").test_client()
    assert status_of(post_event(client, customer("Oi"))) == "skipped"
    assert upstreams.llm.call_count == 0 and upstreams.sent_texts() == []


def test_commands_still_work_out_of_hours(make_app, upstreams) -> None:
    client = make_app(business_hours=closed_now(), out_of_hours_mode="silent").test_client()
    assert status_of(post_event(client, customer("PARAR"))) == "command"


def test_answer_mode_tells_the_llm_it_is_closed_and_when_it_reopens(make_app, upstreams) -> None:
    client = make_app(business_hours=closed_now()).test_client()
    assert status_of(post_event(client, customer("Quero falar com alguém"))) == "success"
    messages = prompts(upstreams)[-1]
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    note = messages[1]["content"]
    assert f"Horário de atendimento da equipe: {closed_now()}." in note
    assert "fora do horário agora e retorna amanhã às 08:00" in note
    now = datetime.now(ZoneInfo("America/Sao_Paulo"))
    assert WEEKDAY_PT[now.weekday()] in note and now.strftime("%d/%m/%Y") in note


def test_open_hours_say_so_and_the_hours_note_comes_after_the_history(make_app, upstreams) -> None:
    client = make_app(business_hours="seg-dom 00:00-24:00", out_of_hours_mode="notice").test_client()
    post_event(client, customer("Meu nome é Ana"))
    post_event(client, customer("Qual é o meu nome?"))
    messages = prompts(upstreams)[-1]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "system", "user"]
    assert "A equipe está atendendo agora" in messages[3]["content"]


def test_without_business_hours_the_prompt_is_as_before(client, upstreams) -> None:
    post_event(client, customer("Oi"))
    assert [m["role"] for m in prompts(upstreams)[-1]] == ["system", "user"]


# --- knowledge -------------------------------------------------------------------------------------

FAQ = """# Padaria Pão Quente
Endereço: Rua das Flores, 123, Centro.
Pão francês: R$ 0,90 a unidade.
Entregamos no Centro e na Vila Nova, taxa R$ 5,00.
"""


def pipeline_of(app: Any) -> Any:
    return app.extensions[EXTENSION_KEY].runtime().dispatcher.pipeline


def test_the_knowledge_follows_the_system_prompt_with_the_instruction(make_app, upstreams, tmp_path: Path) -> None:
    faq = tmp_path / "faq.md"
    faq.write_text(FAQ, encoding="utf-8")
    client = make_app(ai_knowledge_file=str(faq), ai_system_prompt="Você é a atendente da padaria.").test_client()
    post_event(client, customer("Quanto custa o pão?"))
    system = prompts(upstreams)[-1][0]
    assert system["role"] == "system"
    assert system["content"] == (
        f"Você é a atendente da padaria.\n\n{KNOWLEDGE_INSTRUCTION}\n\n<knowledge>\n{FAQ.strip()}\n</knowledge>"
    )


def test_a_folder_of_files_is_read_in_name_order_with_each_files_name(tmp_path: Path) -> None:
    folder = tmp_path / "conhecimento"
    (folder / "sub").mkdir(parents=True)
    (folder / "b-entrega.md").write_text("Entregamos no Centro.", encoding="utf-8")
    (folder / "a-precos.txt").write_text("Pão: R$ 0,90.", encoding="utf-8")
    (folder / "sub" / "c-horario.md").write_text("Abrimos às 6h.", encoding="utf-8")
    (folder / "foto.jpg").write_bytes(b"\xff\xd8")
    base = KnowledgeBase(str(folder), 10_000)
    section = base.section()
    assert section.index("# a-precos.txt\nPão: R$ 0,90.") < section.index("# b-entrega.md") < section.index(
        "# c-horario.md\nAbrimos às 6h.")
    assert "foto" not in section
    assert [os.path.basename(f.path) for f in read_knowledge(f"{folder}/a-precos.txt, {folder}/b-entrega.md",
                                                             10_000)] == ["a-precos.txt", "b-entrega.md"]


def test_an_edited_file_takes_effect_on_the_next_message_and_an_unchanged_one_is_not_reread(
        make_app, upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knowledge, "CHECK_SECONDS", 0.0)  # look at the file on every message
    faq = tmp_path / "faq.md"
    faq.write_text("Pão francês: R$ 0,90.", encoding="utf-8")
    app = make_app(ai_knowledge_file=str(faq))
    client = app.test_client()
    for text in ("Preço do pão?", "E agora?", "De novo?"):
        post_event(client, customer(text))
    base = pipeline_of(app).profiles.profile("default").knowledge
    assert base.loads == 1  # three messages, one read: the file did not change
    faq.write_text("Pão francês: R$ 1,10 (novo preço).", encoding="utf-8")
    post_event(client, customer("E o preço hoje?"))
    system = prompts(upstreams)[-1][0]["content"]
    assert "R$ 1,10 (novo preço)" in system and "R$ 0,90" not in system
    assert base.loads == 2


def test_a_broken_edit_keeps_the_last_good_knowledge(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("whatsapp_webhook"), "propagate", True)  # an app may have turned it off
    faq = tmp_path / "faq.md"
    faq.write_text("Pão: R$ 0,90.", encoding="utf-8")
    now = [0.0]
    base = KnowledgeBase(str(faq), 1000, clock=lambda: now[0])
    assert "R$ 0,90" in base.section()
    faq.write_text("x" * 5000, encoding="utf-8")
    now[0] += 0.5
    assert "R$ 0,90" in base.section()  # not looked at again within CHECK_SECONDS
    now[0] += 1.0
    assert "R$ 0,90" in base.section()  # too big: the last good text stays
    assert "over AI_KNOWLEDGE_MAX_CHARS=1,000" in caplog.text


def test_start_up_refuses_a_knowledge_file_too_big_or_missing_naming_it(tmp_path: Path) -> None:
    env = {"OPENROUTER_API_KEY": "sk-or-v1-test", "WAHA_API_KEY": "waha-test"}
    big = tmp_path / "catalogo.md"
    big.write_text("a" * 1500, encoding="utf-8")
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**env, "AI_KNOWLEDGE_FILE": str(big), "AI_KNOWLEDGE_MAX_CHARS": "1000"})
    assert (f"AI_KNOWLEDGE_FILE: '{big}' has 1,500 characters, over AI_KNOWLEDGE_MAX_CHARS=1,000: shorten it or"
            " raise AI_KNOWLEDGE_MAX_CHARS") in str(raised.value)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**env, "AI_KNOWLEDGE_FILE": str(tmp_path / "nao-existe.md")})
    assert f"AI_KNOWLEDGE_FILE: '{tmp_path / 'nao-existe.md'}' does not exist" in str(raised.value)
    assert Settings.from_env({**env, "AI_KNOWLEDGE_MAX_CHARS": "1500", "AI_KNOWLEDGE_FILE": str(big)})


def test_the_stable_part_of_the_prompt_is_the_same_bytes_message_after_message(make_app, upstreams,
                                                                               tmp_path: Path) -> None:
    # Providers cache a prompt's prefix: the system part must not change with the clock or the chat.
    faq = tmp_path / "faq.md"
    faq.write_text(FAQ, encoding="utf-8")
    client = make_app(ai_knowledge_file=str(faq), business_hours="seg-dom 00:00-24:00").test_client()
    post_event(client, customer("Oi"))
    time.sleep(0.01)
    post_event(client, customer("Oi", chat=wp.OTHER_PN))
    first, second = prompts(upstreams)
    assert json.dumps(first[0]) == json.dumps(second[0])
    assert "Agora são" not in first[0]["content"]


def test_cached_prompt_tokens_reach_the_metrics(client, upstreams) -> None:
    from tests.test_operations import scraped

    def cached(request: httpx.Request) -> httpx.Response:
        body = completion("ok")
        body["usage"]["prompt_tokens_details"] = {"cached_tokens": 1200}
        return httpx.Response(200, json=body)

    before = scraped(client).get(("webhook_llm_tokens_total", (("kind", "cached"),)), 0.0)
    upstreams.llm.side_effect = cached
    post_event(client, customer("Oi"))
    after = scraped(client)[("webhook_llm_tokens_total", (("kind", "cached"),))]
    assert after - before == 1200
