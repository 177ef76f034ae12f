"""Event parsing and filters, fed with WAHA-shaped envelopes from all three engines."""

from __future__ import annotations

import json

import pytest

from fakes import waha_payloads as wp
from whatsapp_webhook.events import (
    CHAT_ID_PATTERN,
    BadRequestError,
    Ignored,
    IncomingMessage,
    OwnMessage,
    SessionStatus,
    classify_event,
    is_safe_id,
    parse_event,
)


def classify(envelope: dict, *, reply_in_groups: bool = False):
    return classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=reply_in_groups)


@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("sender", [wp.CUSTOMER_PN, wp.CUSTOMER_LID])
def test_customer_text_is_answered_in_the_chat_it_came_from(engine: str, sender: str) -> None:
    envelope = wp.text_message(engine, body="  Qual o horário?  ", sender=sender)
    message = classify(envelope)
    assert isinstance(message, IncomingMessage)
    assert message.chat_id == sender  # @lid kept exactly as received
    assert message.session == envelope["session"] and message.engine == engine
    assert message.text == "Qual o horário?"
    assert message.message_id == envelope["payload"]["id"]
    assert message.event_id == envelope["id"]


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_dedupe_key_is_the_bare_message_id_shared_by_lid_and_phone_deliveries(engine: str) -> None:
    by_lid, by_phone = wp.lid_and_pn_pair(engine)
    first, second = classify(by_lid), classify(by_phone)
    assert first.chat_id != second.chat_id and by_lid["id"] != by_phone["id"]
    assert first.dedupe_key == second.dedupe_key


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_message_and_message_any_of_one_message_share_a_key(engine: str) -> None:
    envelope = wp.text_message(engine)
    twin = wp.text_message(engine, event="message.any", message_id=envelope["payload"]["id"].split("_")[2])
    assert classify(envelope).dedupe_key == classify(twin).dedupe_key


@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("builder, reason", [
    (wp.message_ack, "event_not_handled"),
    (wp.reaction, "event_not_handled"),
    (wp.own_api_message_any, "from_me"),
    (wp.status_broadcast_message, "status_broadcast"),
    (wp.newsletter_message, "channel"),
    (wp.broadcast_list_message, "broadcast_list"),
])
def test_what_a_reply_bot_must_not_answer(engine: str, builder, reason: str) -> None:
    decision = classify(builder(engine))
    assert isinstance(decision, Ignored) and decision.reason == reason


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_person_writing_from_the_bots_phone_is_our_own_message_in_the_customers_chat(engine: str) -> None:
    envelope = wp.own_app_message_any(engine, chat=wp.CUSTOMER_LID, body="Oi, aqui é a Ana da loja")
    decision = classify(envelope)
    assert isinstance(decision, OwnMessage)
    assert decision.chat_id == wp.CUSTOMER_LID  # WEBJS puts the chat in 'to' for our own messages
    assert decision.text == "Oi, aqui é a Ana da loja" and decision.message_id == envelope["payload"]["id"]


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_in_groups_a_mention_or_a_quote_of_the_bot_addresses_it(engine: str) -> None:
    plain = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, body="bom dia pessoal")
    assert classify(plain, reply_in_groups=True).mentions_bot is False
    number = wp.BOT_ID.split("@")[0]
    mentioned = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, body=f"@{number} qual o preço?")
    mentioned["me"] = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
    assert classify(mentioned, reply_in_groups=True).mentions_bot is True
    quoting = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, body="e para amanhã?",
                              reply_to={"id": f"true_{wp.GROUP_ID}_3EB0ABC", "participant": wp.BOT_LID,
                                        "body": "Hoje abrimos às 9h."})
    quoting["me"] = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
    message = classify(quoting, reply_in_groups=True)
    # WEBJS leaves the quoted message's id out (WAHA: "depends on the engine").
    assert message.mentions_bot is True and message.reply_to_id == quoting["payload"]["replyTo"].get("id")


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_groups_are_ignored_unless_enabled_and_then_answered_in_the_group(engine: str) -> None:
    envelope = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID)
    assert classify(envelope) == Ignored("group_chat", "group messages are not answered (REPLY_IN_GROUPS=false)")
    message = classify(envelope, reply_in_groups=True)
    assert message.chat_id == wp.GROUP_ID and message.participant == wp.CUSTOMER_LID and message.is_group


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_messages_from_the_bots_own_ids_are_ignored(engine: str) -> None:
    for own_id in (wp.BOT_ID, wp.BOT_LID):
        envelope = wp.text_message(engine, sender=own_id)
        envelope["me"] = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
        assert classify(envelope).reason == "own_number"


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_message_comes_back_from_the_inbox_as_it_went_in(engine: str) -> None:
    """The inbox keeps each message as to_json's text; a worker answers what from_json makes of it."""
    quoting = wp.text_message(engine, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, body="e para amanhã? 😊",
                              reply_to={"id": f"true_{wp.GROUP_ID}_3EB0ABC", "participant": wp.BOT_LID,
                                        "body": "Hoje abrimos às 9h."})
    quoting["me"] = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
    for envelope in (wp.text_message(engine), quoting, wp.media_message(engine, kind="audio", caption="ouça")):
        message = classify(envelope, reply_in_groups=True)
        assert isinstance(message, IncomingMessage)
        assert IncomingMessage.from_json(message.to_json()) == message
        assert "😊" not in (message.text or "") or "😊" in message.to_json()  # kept as written, not escaped


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_message_id_no_inbox_can_key_is_ignored_with_its_reason(engine: str) -> None:
    group_id = f"false_{wp.GROUP_ID}_3EB0C431C26A1916E9C5_{wp.CUSTOMER_PN}"  # a real shape, among the longest
    assert isinstance(classify(wp.text_message(engine, message_id=group_id)), IncomingMessage)
    for bad in ("3EB0" + "A" * 600, "3EB0\x00A1"):
        ignored = classify_event(parse_event(json.dumps(wp.text_message(engine, message_id=bad)).encode()),
                                 reply_in_groups=False)
        assert isinstance(ignored, Ignored) and ignored.reason == "invalid_message_id", bad[:10]


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_files_mimetype_and_name_lose_what_no_store_or_log_can_hold(engine: str) -> None:
    """A NUL or a lone surrogate in media.mimetype / media.filename (unchecked JSON strings) is dropped, not kept
    to be refused later by the database (PostgreSQL's text cannot hold NUL) or written into a log line."""
    envelope = wp.media_message(engine, kind="document", mimetype="application/pdf\x00", filename="nota\ud800\n.pdf")
    # json.dumps escapes both as \\u0000 and \\ud800, as a sender's JSON may; parse_event decodes them back.
    message = classify_event(parse_event(json.dumps(envelope).encode()), reply_in_groups=False)
    assert isinstance(message, IncomingMessage)
    assert (message.media_mimetype, message.media_filename) == ("application/pdf", "nota.pdf")
    kept = wp.media_message(engine, kind="document", filename="Relatório\u00a0Final\u2028v2.pdf")
    assert classify(kept).media_filename == "Relatório\u00a0Final v2.pdf"  # a no-break space is a name's own


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_media_uses_the_caption_or_is_flagged_as_non_text(engine: str) -> None:
    assert classify(wp.media_message(engine, caption="Quanto custa este?")).text == "Quanto custa este?"
    for kind in ("image", "audio", "sticker", "document"):
        message = classify(wp.media_message(engine, kind=kind))
        assert isinstance(message, IncomingMessage) and message.text is None, kind
    assert classify(wp.location_message(engine)).text is None


def test_missing_me_and_envelope_id_are_tolerated() -> None:
    envelope = wp.text_message("WEBJS")
    envelope.pop("id")
    envelope["me"] = None
    assert isinstance(classify(envelope), IncomingMessage)


def test_a_message_without_any_content_is_ignored() -> None:
    envelope = wp.text_message("NOWEB", body="")
    assert classify(envelope).reason == "no_content"


@pytest.mark.parametrize("body, error", [
    (b"", "request body is empty"),
    (b"   ", "request body is empty"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b'"message"', "must be a JSON object, got a string"),
    (b"42", "must be a JSON object, got a number"),
    (b"null", "must be a JSON object, got null"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"session": "default"}', "field 'event' is required"),
    (b'{"event": 7}', "field 'event' must be a string, got a number"),
    (b'{"event": "message", "payload": "hi"}', "field 'payload' must be an object, got a string"),
    (b'{"event": "message", "me": [], "payload": {}}', "field 'me' must be an object"),
])
def test_malformed_bodies_are_explained(body: bytes, error: str) -> None:
    with pytest.raises(BadRequestError, match=error.replace("(", r"\(")):
        parse_event(body)


@pytest.mark.parametrize("mutate, error", [
    (lambda p: p.update({"from": 5511}), "field 'payload.from' must be a string, got a number"),
    (lambda p: p.update({"fromMe": "no"}), "field 'payload.fromMe' must be a boolean, got a string"),
    (lambda p: p.update({"body": 123}), "field 'payload.body' must be a string, got a number"),
    (lambda p: p.update({"timestamp": True}), "field 'payload.timestamp' must be a number, got a boolean"),
    (lambda p: p.update({"hasMedia": 1}), "field 'payload.hasMedia' must be a boolean"),
])
def test_message_fields_of_the_wrong_type_are_explained(mutate, error: str) -> None:
    envelope = wp.text_message("GOWS")
    mutate(envelope["payload"])
    with pytest.raises(BadRequestError, match=error):
        classify(envelope)


def test_message_without_session_cannot_be_answered() -> None:
    envelope = wp.text_message("WEBJS")
    envelope.pop("session")
    assert classify(envelope).reason == "no_session"


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_message_without_from_is_answered_in_the_chat_its_id_names(engine: str) -> None:
    envelope = wp.text_message(engine, sender=wp.CUSTOMER_LID, body="Oi")
    envelope["payload"].pop("from")
    message = classify(envelope)
    assert isinstance(message, IncomingMessage) and message.chat_id == wp.CUSTOMER_LID


def test_waha_status_broadcast_example_without_from_is_ignored_as_a_status() -> None:
    envelope = wp.status_broadcast_message("WEBJS")
    envelope["payload"].pop("from")
    assert classify(envelope).reason == "status_broadcast"


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: (p.pop("from"), p.pop("id")), "no_chat"),
    (lambda p: (p.pop("from"), p.update({"id": "not-a-waha-id"})), "no_chat"),
    (lambda p: p.pop("id"), "no_message_id"),
])
def test_a_well_formed_message_that_cannot_be_answered_is_ignored_with_its_reason(mutate, reason: str) -> None:
    envelope = wp.text_message("GOWS")
    mutate(envelope["payload"])
    assert classify(envelope).reason == reason


@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("state, check", [("WORKING", "ok"), ("SCAN_QR_CODE", "degraded"), ("STARTING", "degraded"),
                                          ("FAILED", "failing"), ("STOPPED", "failing")])
def test_session_status_events_say_what_health_should_report(engine: str, state: str, check: str) -> None:
    envelope = wp.session_status(engine, status=state)
    decision = classify(envelope)
    assert isinstance(decision, SessionStatus) and decision.state == state
    assert decision.check[0] == check and state in decision.check[1]


def test_session_status_with_an_unknown_state_or_odd_name_is_not_recorded() -> None:
    unknown = wp.session_status("WEBJS")
    unknown["payload"]["status"] = "MAYBE"
    for envelope in (unknown, {**wp.session_status("WEBJS"), "session": "a/../b"}):
        assert classify(envelope).reason == "session_status"


@pytest.mark.parametrize("chat", ["..", ".", "../../api/x@c.us", "a/b@c.us", "x%2F..@c.us", "55 11@c.us",
                                  "5511\n@c.us", "5511\u2028@c.us"])
def test_a_chat_id_that_could_steer_a_waha_url_is_ignored(chat: str) -> None:
    envelope = wp.text_message("WEBJS")
    envelope["payload"]["from"] = chat
    assert classify(envelope).reason == "invalid_chat_id"


@pytest.mark.parametrize("session", ["..", ".", "a/b", "lo%2Fja"])
def test_a_session_name_that_could_steer_a_waha_url_is_ignored(session: str) -> None:
    envelope = wp.text_message("NOWEB")
    envelope["session"] = session
    assert classify(envelope).reason == "invalid_session"


@pytest.mark.parametrize("chat", [wp.CUSTOMER_PN, wp.CUSTOMER_LID, "120363000000000000@g.us", "status@broadcast"])
def test_real_whatsapp_ids_are_safe(chat: str) -> None:
    assert is_safe_id(chat, CHAT_ID_PATTERN)
