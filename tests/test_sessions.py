"""One configuration per WhatsApp number (SESSIONS_FILE), the daily LLM budget, and /stats and /metrics by
session, seen from WAHA, the LLM and an operator (respx fakes; the budget's day change with a fixed clock)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from fakes import waha_payloads as wp
from tests.conftest import completion, make_settings, post_event
from tests.test_operations import scraped
from tests.test_webhook_app import BOT_MENTION, group_message, health, stats
from whatsapp_webhook import sessions_config
from whatsapp_webhook.business import BusinessProfiles, budget_verdict, describe_profile
from whatsapp_webhook.sessions_config import SessionsFileError, parse_sessions
from whatsapp_webhook.settings import DEFAULT_FALLBACK_MESSAGE, Settings, SettingsError
from whatsapp_webhook.store import StateStore

REQUIRED = {"OPENROUTER_API_KEY": "sk-or-v1-test", "WAHA_API_KEY": "waha-test"}

TWO_NUMBERS = """
[default]
ai_system_prompt = "Você é a atendente da Padaria Pão Quente."
ai_knowledge_file = "padaria.md"

[loja2]
ai_system_prompt = "Você é o assistente da Confeitaria Doce Lar."
ai_knowledge_file = "confeitaria/"
openrouter_model = "google/gemini-3.5-flash"
openrouter_fallback_models = []
fallback_message = "A Doce Lar volta já."
"""


def two_numbers(folder: Path, text: str = TWO_NUMBERS) -> Path:
    (folder / "padaria.md").write_text("Pão francês: R$ 0,90.", encoding="utf-8")
    (folder / "confeitaria").mkdir(exist_ok=True)
    (folder / "confeitaria" / "bolos.md").write_text("Bolo de cenoura: R$ 38,00.", encoding="utf-8")
    path = folder / "sessions.toml"
    path.write_text(text, encoding="utf-8")
    return path


def from_session(session: str, body: str = "Oi", *, chat: str = wp.CUSTOMER_PN) -> dict[str, Any]:
    return wp.text_message("WEBJS", sender=chat, body=body, session=session)


def llm_calls(upstreams: Any) -> list[dict[str, Any]]:
    return upstreams.calls_to("llm")


# --- the file --------------------------------------------------------------------------------------

def test_the_file_reads_each_sessions_overrides_in_the_settings_types(tmp_path: Path) -> None:
    config = parse_sessions(
        '[loja2]\nbusiness_holidays = ["2026-12-25", "2027-01-01"]\nopenrouter_fallback_models = ["a/b", "c/d"]\n'
        'reply_in_groups = true\nllm_daily_budget_usd = 3\nai_knowledge_file = "kb/faq.md, /abs/x.md"\n'
        'out_of_hours_mode = "Notice"\nenabled = false\n[vazia]\n',
        path=str(tmp_path / "sessions.toml"),
    )
    loja2 = config.sessions["loja2"]
    assert dict(loja2.values) == {
        "business_holidays": "2026-12-25, 2027-01-01", "openrouter_fallback_models": ("a/b", "c/d"),
        "reply_in_groups": True, "llm_daily_budget_usd": 3.0, "out_of_hours_mode": "notice",
        "ai_knowledge_file": f"{tmp_path / 'kb' / 'faq.md'},/abs/x.md"}  # relative to the file's folder
    assert loja2.enabled is False and config.sessions["vazia"].enabled is True


@pytest.mark.parametrize(("text", "problem"), [
    ('[loja2]\nai_prompt = "x"\n', "SESSIONS_FILE: [loja2] has an unknown key 'ai_prompt'; did you mean ai_system_prompt?"),
    ('[loja2]\nopenrouter_api_key = "x"\n', "SESSIONS_FILE: [loja2] has an unknown key 'openrouter_api_key'"),
    ('[loja2]\nenabled = "yes"\n', "SESSIONS_FILE: [loja2] enabled must be true or false (without quotes), got 'yes'"),
    ('[loja2]\nout_of_hours_mode = "quiet"\n', "[loja2] out_of_hours_mode must be one of answer, notice, silent"),
    ('[loja2]\nllm_daily_budget_usd = -1\n', "[loja2] llm_daily_budget_usd must be a number of dollars"),
    ('ai_system_prompt = "x"\n', "ai_system_prompt = ... is outside any table"),
    ('[loja2\n', "is not valid TOML"),
])
def test_a_wrong_key_or_value_is_refused_naming_the_session_and_the_key(text: str, problem: str) -> None:
    with pytest.raises(SessionsFileError) as raised:
        parse_sessions(text, path="sessions.toml")
    assert any(problem in each for each in raised.value.problems), raised.value.problems


def test_start_up_stops_on_a_bad_sessions_file_or_a_bad_value_in_a_session(tmp_path: Path) -> None:
    path = tmp_path / "sessions.toml"
    path.write_text('[loja2]\nai_prompt = "x"\n', encoding="utf-8")
    with pytest.raises(SettingsError, match=r"\[loja2\] has an unknown key 'ai_prompt'"):
        Settings.from_env({**REQUIRED, "SESSIONS_FILE": str(path)})
    path.write_text('[loja2]\nbusiness_hours = "seg-sexx 08:00-18:00"\nai_knowledge_file = "nao.md"\n', "utf-8")
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**REQUIRED, "SESSIONS_FILE": str(path)})
    assert "SESSIONS_FILE: [loja2] BUSINESS_HOURS: unknown day name 'sexx' at character 5" in str(raised.value)
    assert f"SESSIONS_FILE: [loja2] AI_KNOWLEDGE_FILE: '{tmp_path / 'nao.md'}' does not exist" in str(raised.value)
    with pytest.raises(SettingsError, match="SESSIONS_FILE .* cannot be read"):
        Settings.from_env({**REQUIRED, "SESSIONS_FILE": str(tmp_path / "missing.toml")})


def test_check_shows_each_sessions_effective_configuration_without_secrets(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sessions_file=str(two_numbers(tmp_path)), llm_daily_budget_usd=5.0,
                             business_hours="seg-sex 08:00-18:00")
    lines = [describe_profile(p) for p in BusinessProfiles(settings).all_profiles().values()]
    assert lines[0].startswith("sessions not in SESSIONS_FILE: model google/gemini-3.1-flash-lite")
    loja2 = next(line for line in lines if line.startswith("session loja2:"))
    assert "model google/gemini-3.5-flash (fallbacks: none)" in loja2
    assert "hours 'seg-sex 08:00-18:00' (America/Sao_Paulo), out of hours: answer" in loja2
    assert f"knowledge {tmp_path / 'confeitaria'}" in loja2 and "'Você é o assistente da Confeitaria Doce Lar.'" in loja2
    assert "budget 5 USD/day all sessions" in loja2
    assert not any(secret in "\n".join(lines) for secret in (settings.openrouter_api_key, settings.waha_api_key))


# --- two numbers, two configurations ---------------------------------------------------------------

def test_each_number_gets_its_own_prompt_knowledge_model_and_fallback(make_app, upstreams, tmp_path: Path) -> None:
    client = make_app(sessions_file=str(two_numbers(tmp_path))).test_client()
    post_event(client, from_session("default", "Preço do pão?"))
    post_event(client, from_session("loja2", "Preço do bolo?"))
    post_event(client, from_session("loja3", "Oi"))  # not in the file: the global settings
    padaria, confeitaria, other = llm_calls(upstreams)
    assert padaria["messages"][0]["content"].startswith("Você é a atendente da Padaria Pão Quente.")
    assert "Pão francês: R$ 0,90." in padaria["messages"][0]["content"] and "Bolo" not in padaria["messages"][0][
        "content"]
    assert confeitaria["messages"][0]["content"].startswith("Você é o assistente da Confeitaria Doce Lar.")
    assert "Bolo de cenoura: R$ 38,00." in confeitaria["messages"][0]["content"]
    assert (padaria["model"], confeitaria["model"]) == ("google/gemini-3.1-flash-lite", "google/gemini-3.5-flash")
    assert "models" not in confeitaria  # no fallbacks for loja2
    assert other["messages"][0]["content"] == make_settings(tmp_path).ai_system_prompt
    sent = {s["session"]: s["text"] for s in upstreams.sent_texts()}
    assert set(sent) == {"default", "loja2", "loja3"}
    upstreams.llm.side_effect = lambda request: httpx.Response(401, json={"error": {"code": 401}})
    post_event(client, from_session("loja2", "E agora?"))
    post_event(client, from_session("default", "E agora?"))
    assert [s["text"] for s in upstreams.sent_texts()[-2:]] == ["A Doce Lar volta já.", DEFAULT_FALLBACK_MESSAGE]


def test_a_disabled_number_is_never_answered(make_app, upstreams, tmp_path: Path) -> None:
    path = two_numbers(tmp_path, TWO_NUMBERS + "enabled = false\n")
    client = make_app(sessions_file=str(path)).test_client()
    assert post_event(client, from_session("loja2", "PARAR")).get_json()["result"]["status"] == "skipped"
    assert post_event(client, from_session("loja2", "Oi")).get_json()["result"]["status"] == "skipped"
    assert llm_calls(upstreams) == [] and upstreams.sent_texts() == []
    assert post_event(client, from_session("default", "Oi")).get_json()["result"]["status"] == "success"


def test_groups_can_be_answered_on_one_number_only(make_app, upstreams, tmp_path: Path) -> None:
    path = two_numbers(tmp_path, TWO_NUMBERS + "reply_in_groups = true\n")
    client = make_app(sessions_file=str(path), reply_in_groups=False).test_client()
    asked = f"{BOT_MENTION} vocês abrem sábado?"
    assert post_event(client, group_message("NOWEB", asked, session="default")).get_json()["reason"] == "group_chat"
    answered = post_event(client, group_message("NOWEB", asked, session="loja2")).get_json()
    assert answered["result"]["status"] == "success"


def test_an_edited_sessions_file_takes_effect_without_a_restart_and_a_broken_one_is_not_applied(
        make_app, upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_config, "CHECK_SECONDS", 0.0)
    path = two_numbers(tmp_path)
    log_file = tmp_path / "server.log"
    client = make_app(sessions_file=str(path), log_file=str(log_file)).test_client()
    post_event(client, from_session("loja2", "Oi"))
    path.write_text(TWO_NUMBERS.replace("Confeitaria Doce Lar", "Confeitaria Nova"), encoding="utf-8")
    post_event(client, from_session("loja2", "Oi de novo"))
    assert llm_calls(upstreams)[-1]["messages"][0]["content"].startswith("Você é o assistente da Confeitaria Nova.")
    path.write_text(TWO_NUMBERS.replace("openrouter_fallback_models", "openrouter_fallbacks"), encoding="utf-8")
    post_event(client, from_session("loja2", "E agora?"))
    assert llm_calls(upstreams)[-1]["messages"][0]["content"].startswith("Você é o assistente da Confeitaria Nova.")
    logged = log_file.read_text(encoding="utf-8")
    assert "unknown key 'openrouter_fallbacks'" in logged and "keep the configuration they had" in logged
    path.write_text(TWO_NUMBERS.replace('"padaria.md"', '"sumiu.md"'), encoding="utf-8")
    post_event(client, from_session("default", "Oi"))
    logged = log_file.read_text(encoding="utf-8")
    assert "SESSIONS_FILE not applied" in logged and "sumiu.md' does not exist" in logged
    assert "Pão francês" in llm_calls(upstreams)[-1]["messages"][0]["content"]


def test_a_file_read_while_an_editor_rewrites_it_keeps_the_sessions_it_had(tmp_path: Path) -> None:
    """Editors and `>` truncate the file, then write it: read in between, every number would lose its profile."""
    path = two_numbers(tmp_path)
    now = [0.0]
    sessions = sessions_config.SessionsFile(str(path), clock=lambda: now[0], check_seconds=0.0)
    assert set(sessions.current().sessions) == {"default", "loja2"}
    path.write_text("", encoding="utf-8")  # truncated: the new text is not there yet
    assert set(sessions.current().sessions) == {"default", "loja2"}
    assert set(sessions.current().sessions) == {"default", "loja2"}  # however often it is looked at meanwhile
    path.write_text(TWO_NUMBERS.replace("[loja2]", "[filial3]"), encoding="utf-8")
    assert set(sessions.current().sessions) == {"default", "filial3"}
    path.write_text("", encoding="utf-8")  # emptied on purpose: it stays empty
    now[0] += 0.5
    assert set(sessions.current().sessions) == {"default", "filial3"}
    now[0] += sessions_config.EMPTY_FILE_SECONDS
    assert sessions.current().sessions == {}


# --- the daily budget ------------------------------------------------------------------------------

def priced(cost: float) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        body = completion("ok")
        body["usage"]["cost"] = cost
        return httpx.Response(200, json=body)
    return answer


def test_once_the_days_spend_reaches_the_budget_customers_get_the_fallback_without_an_llm_call(
        make_app, upstreams, tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    client = make_app(llm_daily_budget_usd=0.001, log_file=str(log_file)).test_client()
    upstreams.llm.side_effect = priced(0.0006)
    outcomes = [post_event(client, from_session("default", f"pergunta {n}", chat=chat)).get_json()["result"][
        "status"] for n, chat in enumerate([wp.CUSTOMER_PN, wp.OTHER_PN, wp.CUSTOMER_PN, wp.OTHER_PN])]
    assert outcomes == ["success", "success", "fallback", "fallback"]
    assert upstreams.llm.call_count == 2  # 0.0012 USD spent >= 0.001: no third call
    assert [s["text"] for s in upstreams.sent_texts()[2:]] == [DEFAULT_FALLBACK_MESSAGE] * 2
    assert log_file.read_text(encoding="utf-8").count("decision=budget_reached") == 1  # logged once
    status, document = health(client)
    assert (status, document["status"], document["checks"]["llm"]["status"]) == (200, "degraded", "degraded")
    assert "LLM_DAILY_BUDGET_USD=0.001 USD reached today" in document["checks"]["llm"]["reason"]
    assert "until midnight (America/Sao_Paulo)" in document["checks"]["llm"]["reason"]


def test_a_sessions_own_cap_stops_only_that_number(make_app, upstreams, tmp_path: Path) -> None:
    path = two_numbers(tmp_path, TWO_NUMBERS + "llm_daily_budget_usd = 0.0005\n")
    client = make_app(sessions_file=str(path)).test_client()
    upstreams.llm.side_effect = priced(0.0006)
    statuses = [post_event(client, from_session(s, f"oi {n}")).get_json()["result"]["status"]
                for n, s in enumerate(["loja2", "loja2", "default", "default"])]
    assert statuses == ["success", "fallback", "success", "success"]
    assert upstreams.sent_texts()[1]["text"] == "A Doce Lar volta já."
    assert "[loja2] llm_daily_budget_usd=0.0005 USD reached" in health(client)[1]["checks"]["llm"]["reason"]


def test_the_budget_starts_again_at_midnight_in_the_business_timezone(tmp_path: Path) -> None:
    zone = ZoneInfo("America/Sao_Paulo")
    store = StateStore(str(tmp_path / "state.db"))
    store.initialize()
    profiles = BusinessProfiles(make_settings(tmp_path, llm_daily_budget_usd=1.0))
    profile = profiles.profile("default")
    late = datetime(2026, 12, 1, 23, 50, tzinfo=zone).timestamp()  # 02:50 UTC on Dec 2: still Dec 1 here
    profiles.record_spend(store, profile, late, 1.2)
    assert not profiles.budget(store, profile, late + 60).allowed
    assert profiles.budget(store, profile, datetime(2026, 12, 2, 0, 0, tzinfo=zone).timestamp()).allowed
    store.close()
    assert budget_verdict(global_cap=0, global_spent=99, session_cap=None, session_spent=99, session="x").allowed
    assert not budget_verdict(global_cap=0, global_spent=0, session_cap=1, session_spent=1, session="x").allowed


# --- by session in /stats and /metrics ---------------------------------------------------------------

def test_stats_and_metrics_break_messages_and_cost_down_by_session(make_app, upstreams, tmp_path: Path) -> None:
    client = make_app(sessions_file=str(two_numbers(tmp_path))).test_client()
    before = scraped(client)
    upstreams.llm.side_effect = priced(0.25)
    post_event(client, from_session("default", "um"))
    post_event(client, from_session("loja2", "dois"))
    post_event(client, from_session("loja2", "três", chat=wp.OTHER_PN))
    post_event(client, from_session("desconhecida", "quatro"))
    upstreams.llm.side_effect = lambda request: httpx.Response(401, json={"error": {"code": 401}})
    post_event(client, from_session("loja2", "cinco"))
    by_session = stats(client)["by_session"]
    assert by_session == {
        "default": {"messages": {"success": 1}, "llm_cost_usd": 0.25},
        "loja2": {"messages": {"success": 2, "fallback": 1}, "llm_cost_usd": 0.5},
        "_other": {"messages": {"success": 1}, "llm_cost_usd": 0.25},
    }
    after = scraped(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("webhook_session_messages_total", session="loja2", outcome="success") == 2
    assert grew("webhook_session_messages_total", session="loja2", outcome="fallback") == 1
    assert grew("webhook_session_llm_cost_usd_total", session="loja2") == pytest.approx(0.5)
    assert grew("webhook_session_llm_cost_usd_total", session="_other") == pytest.approx(0.25)


def test_check_asks_waha_for_each_number_and_the_llm_server_for_each_numbers_models(tmp_path: Path) -> None:
    from tests.test_operations import HEALTHY, run_check
    text = TWO_NUMBERS.replace('openrouter_model = "google/gemini-3.5-flash"', 'openrouter_model = "google/gemini-9-nope"')
    text += '\n[loja3]\nenabled = false\n'
    results = run_check(tmp_path, HEALTHY, sessions_file=str(two_numbers(tmp_path, text)))
    by_name = {r.name: r for r in results}
    assert by_name["WAHA session default (SESSIONS_FILE)"].ok
    loja2 = by_name["WAHA session loja2 (SESSIONS_FILE)"]
    assert not loja2.ok and loja2.detail == "loja2=not on this WAHA" and "create and pair the session loja2" in loja2.hint
    assert "WAHA session loja3 (SESSIONS_FILE)" not in by_name  # disabled: never answered, not checked
    model = by_name["LLM model [loja2] openrouter_model"]
    assert not model.ok and "google/gemini-9-nope is not among the 3 models" in model.detail
    assert "set [loja2] openrouter_model to a listed id" in model.hint


def test_a_finish_the_store_refuses_is_counted_once_when_the_retry_finishes(make_app, upstreams,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts ride on finish: a refused finish counts nothing (not in /stats, not in /metrics), and the retry,
    which finds the reply already at WAHA, counts the message once."""
    from whatsapp_webhook import EXTENSION_KEY
    from whatsapp_webhook.store_api import StoreUnavailable

    app = make_app(lease_seconds=1.0)
    store = app.extensions[EXTENSION_KEY].store
    real_finish = store.finish
    refused: list[str] = []

    def refuse_once(key: str, owner: str, **kwargs: Any) -> bool:
        if not refused:
            refused.append(key)
            raise StoreUnavailable("database or disk is full")
        return real_finish(key, owner, **kwargs)

    client = app.test_client()
    session_success = ("webhook_session_messages_total", (("outcome", "success"), ("session", "default")))
    before = scraped(client).get(session_success, 0.0)
    monkeypatch.setattr(store, "finish", refuse_once)
    post_event(client, from_session("default", "Oi"))
    give_up = time.monotonic() + 20
    while stats(client)["by_session"].get("default", {}).get("messages") != {"success": 1}:
        assert time.monotonic() < give_up, "the retry never finished the message"
        time.sleep(0.1)
    assert refused and [s["text"] for s in upstreams.sent_texts()] == ["Echo: Oi"]  # sent once, not again
    assert scraped(client)[session_success] - before == 1
