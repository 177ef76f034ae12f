"""admission.ChatAdmission: which claimed messages need an admission (asked of the claim's transaction) and
what it reads; and the admission decided when the reply is composed, for a claim made without asking."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fakes import waha_payloads as wp
from tests.conftest import make_settings
from whatsapp_webhook.admission import ChatAdmission
from whatsapp_webhook.business import BusinessProfiles
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import Admission, AdmissionRequest, ClaimedMessage, InboxStatus, Outcome, Turn, Verdict


def incoming(body: str | None = "Oi", *, session: str = "default", media: bool = False) -> IncomingMessage:
    if media:
        envelope = wp.media_message("WEBJS", caption=body)
    else:
        envelope = wp.text_message("WEBJS", sender=wp.CUSTOMER_PN, body=body or "", session=session)
    envelope["session"] = session
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage)
    return message


def claimed(message: IncomingMessage, **fields: Any) -> ClaimedMessage:
    """`message` as a dispatcher claims it the first time (no reply written yet), with `fields` changed."""
    fresh = ClaimedMessage(message=message, lease_owner="w1", previous_status=InboxStatus.QUEUED, attempts=1,
                           reply_text=None, outcome=None, send_started_at=None, received_at=100.0)
    return replace(fresh, **fields)


@pytest.fixture
def admission_for(tmp_path: Path) -> Iterator[Callable[..., ChatAdmission]]:
    """A ChatAdmission over settings with `overrides`, on a store in tmp_path (closed after the test)."""
    stores: list[StateStore] = []

    def make(**overrides: Any) -> ChatAdmission:
        settings = make_settings(tmp_path, **overrides)
        stores.append(store := StateStore(settings.state_db))
        store.initialize()
        return ChatAdmission(settings=settings, store=store, profiles=BusinessProfiles(settings),
                             media_on=settings.media_enabled)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def admission(admission_for: Callable[..., ChatAdmission]) -> ChatAdmission:
    return admission_for(rate_limit_per_minute=2, history_turns=4, history_ttl_minutes=30)


def test_a_reply_not_written_yet_asks_for_its_admission_and_the_chats_recent_turns(admission) -> None:
    message = incoming("Qual o horário?")
    request = admission.request(claimed(message, merged=(incoming("E sábado?"),)))
    assert request == AdmissionRequest(texts=["Qual o horário?", "E sábado?"], limits=admission.limits,
                                       history_seconds=30 * 60, history_turns=8)
    assert request.limits.per_minute == 2


def test_a_reply_already_written_or_given_up_asks_for_none(admission) -> None:
    message = incoming()
    written = claimed(message, reply_text="Das 8h às 18h.", outcome=Outcome.SUCCESS, attempts=2)
    assert admission.request(written) is None  # sent word for word, whatever the limits say now
    unsent_fallback = replace(written, reply_text="Volto já.", outcome=Outcome.FALLBACK)
    assert admission.request(unsent_fallback) is not None  # written again: admitted again
    half_sent_fallback = replace(unsent_fallback, previous_status=InboxStatus.SENDING)
    assert admission.request(half_sent_fallback) is None
    worn_out = claimed(message, attempts=admission.settings.reply_max_attempts + 1)
    assert admission.request(worn_out) is None  # the pipeline gives it up without an answer


def test_stop_start_and_a_disabled_number_ask_for_no_admission_and_reset_reads_no_history(
        admission_for, tmp_path) -> None:
    sessions = tmp_path / "sessions.toml"
    sessions.write_text('[loja2]\nenabled = false\n', encoding="utf-8")
    admission = admission_for(sessions_file=str(sessions))
    settings = admission.settings
    assert admission.request(claimed(incoming(settings.stop_word))) is None  # an opt-out always gets through
    assert admission.request(claimed(incoming(settings.start_word.lower()))) is None
    assert admission.request(claimed(incoming("Oi", session="loja2"))) is None  # never answered
    reset = admission.request(claimed(incoming(settings.reset_command)))
    assert reset is not None and reset.history_turns == 0  # limited like any message, but starts afresh
    assert admission.request(claimed(incoming("Oi"))).history_turns == 2 * admission.settings.history_turns


def test_a_file_without_text_reads_history_only_when_the_llm_gets_the_file(admission_for) -> None:
    voice_note = claimed(incoming(None, media=True))
    assert admission_for(media_enabled=True).request(voice_note).history_turns > 0
    without_media = admission_for(media_enabled=False).request(voice_note)
    assert without_media is not None and without_media.history_turns == 0  # answered NON_TEXT_REPLY
    assert admission_for(history_turns=0).request(claimed(incoming("Oi"))).history_turns == 0


def test_the_claims_admission_is_used_as_decided_and_its_history_trimmed(admission_for) -> None:
    admission = admission_for(history_max_chars=12, rate_limit_per_minute=1)
    turns = (Turn(role="user", content="a" * 10), Turn(role="assistant", content="b" * 10),
             Turn(role="user", content="oi"), Turn(role="assistant", content="olá"))
    decided = claimed(incoming(), admission=Admission(verdict=Verdict.OK), history=turns)
    admitted = asyncio.run(admission.admitted(decided, None))
    assert admitted.admission.verdict is Verdict.OK
    assert [turn.content for turn in admitted.history] == ["oi", "olá"]  # HISTORY_MAX_CHARS, from a user turn
    chat = decided.message.chat_key  # decided once, in the claim: nothing counted again here
    assert admission.store.admit(chat, texts=["x"], limits=admission.limits).verdict is Verdict.OK


def test_a_claim_made_without_asking_is_admitted_when_its_reply_is_composed(admission_for) -> None:
    admission = admission_for(rate_limit_per_minute=1)
    first, second = claimed(incoming("Oi")), claimed(incoming("Oi de novo"))
    assert asyncio.run(admission.admitted(first, None)).admission.verdict is Verdict.OK
    limited = asyncio.run(admission.admitted(second, None))
    assert limited.admission.verdict is Verdict.RATE_LIMITED and limited.history == []
