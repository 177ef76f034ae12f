"""Self-checks for the WAHA payload builders (fakes/waha_payloads.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from fakes import waha_payloads as wp

EVT_ID = re.compile(r"^evt_[0-9abcdefghjkmnpqrstvwxyz]{26}$")

MESSAGE_BUILDERS: list[Callable[..., dict[str, Any]]] = [
    wp.text_message,
    lambda e: wp.text_message(e, sender=wp.CUSTOMER_LID),
    lambda e: wp.text_message(e, group=wp.GROUP_ID, sender=wp.CUSTOMER_LID),
    lambda e: wp.text_message(e, reply_to={"id": "3EB0AAAAAAAAAAAAAAAAAA", "participant": wp.BOT_ID, "body": "Oi"}),
    lambda e: wp.media_message(e, caption="Quanto custa?"),
    lambda e: wp.media_message(e, kind="audio"),
    lambda e: wp.media_message(e, kind="sticker", group=wp.GROUP_ID),
    lambda e: wp.media_message(e, kind="document", caption="Segue o pedido"),
    wp.location_message,
    wp.status_broadcast_message,
    wp.newsletter_message,
    wp.broadcast_list_message,
    wp.own_api_message_any,
    wp.own_app_message_any,
    lambda e: wp.own_api_message_any(e, chat=wp.GROUP_ID),
    wp.message_ack,
    wp.reaction,
]


def _chat_of(engine: str, payload: dict[str, Any]) -> str:
    # whatsapp-web.js: for the bot's own messages `from` is the bot and the chat is in `to`
    if engine == "WEBJS" and payload["fromMe"]:
        return payload["to"]
    return payload["from"]


@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("builder", MESSAGE_BUILDERS)
def test_envelope_and_message_id_are_consistent(engine: str, builder: Callable[..., dict[str, Any]]) -> None:
    env = builder(engine)
    assert list(env)[:4] == ["id", "timestamp", "event", "session"]
    assert EVT_ID.match(env["id"]) and isinstance(env["timestamp"], int) and env["timestamp"] > 10**12
    assert env["engine"] == env["environment"]["engine"] == engine
    assert env["environment"]["version"] == wp.WAHA_VERSION and env["environment"]["worker"] == {"id": None}
    assert env["me"]["id"] == wp.BOT_ID and ("jid" in env["me"]) == (engine == "GOWS")

    payload = env["payload"]
    from_me, chat, bare, participant = wp.parse_message_id(payload["id"])
    assert from_me is payload["fromMe"]
    assert chat == _chat_of(engine, payload)
    assert re.fullmatch(r"[0-9A-F]{18,32}", bare)
    if participant is not None:
        assert payload.get("participant") == participant
    elif payload.get("participant") and not (engine == "WEBJS" and env["event"] == "message.reaction"):
        # NOWEB: own API sends in a group carry no participant in key/id
        assert engine == "NOWEB" and payload["fromMe"]
    if "timestamp" in payload:
        assert isinstance(payload["timestamp"], int) and payload["timestamp"] < 10**11  # seconds, not ms
    json.loads(wp.dumps(env))  # serialisable


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_engine_raw_objects(engine: str) -> None:
    env = wp.text_message(engine, sender=wp.CUSTOMER_LID, message_id="A5C0FFEE00112233445566778899AABB")
    data = env["payload"]["_data"]
    if engine == "WEBJS":
        assert data["id"]["_serialized"] == env["payload"]["id"] and data["type"] == "chat"
        assert data["from"] == wp.CUSTOMER_LID
    elif engine == "NOWEB":
        assert data["key"] == {"remoteJid": wp.CUSTOMER_LID, "remoteJidAlt": "5511988887777@s.whatsapp.net",
                               "fromMe": False, "id": "A5C0FFEE00112233445566778899AABB", "addressingMode": "lid"}
        assert "to" not in env["payload"] and "participant" not in env["payload"]
    else:
        info = data["Info"]
        assert (info["Chat"], info["AddressingMode"], info["SenderAlt"]) == (
            wp.CUSTOMER_LID, "lid", "5511988887777@s.whatsapp.net")
        assert env["payload"]["to"] is None and env["payload"]["participant"] is None


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_own_messages_and_media(engine: str) -> None:
    api = wp.own_api_message_any(engine)
    assert api["event"] == "message.any" and api["payload"]["fromMe"] is True and api["payload"]["source"] == "api"
    app = wp.own_app_message_any(engine)
    assert app["payload"]["fromMe"] is True and app["payload"]["source"] == "app"
    media = wp.media_message(engine)["payload"]
    assert media["hasMedia"] is True
    assert media["media"]["url"].startswith(f"{wp.BASE_URL}/api/files/{wp.SESSION}/")
    assert media["media"]["url"].endswith(".jpeg") and media["media"]["mimetype"] == "image/jpeg"
    assert wp.media_message(engine, download=False)["payload"]["media"] is None


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_lid_and_pn_pair(engine: str) -> None:
    by_lid, by_pn = wp.lid_and_pn_pair(engine)
    assert by_lid["id"] != by_pn["id"]
    assert (by_lid["payload"]["from"], by_pn["payload"]["from"]) == (wp.CUSTOMER_LID, wp.CUSTOMER_PN)
    assert wp.parse_message_id(by_lid["payload"]["id"])[2] == wp.parse_message_id(by_pn["payload"]["id"])[2]


def test_dumps_is_compact_json_stringify() -> None:
    assert wp.dumps({"a": [1, 2.0, -23.5505], "b": "Olá 👍", "c": None}) == \
        '{"a":[1,2,-23.5505],"b":"Olá 👍","c":null}'.encode()
    env = wp.text_message("NOWEB")
    assert json.loads(wp.dumps(env)) == env
    assert b", " not in wp.dumps({"x": [1, 2], "y": {"z": 1}}) and b": " not in wp.dumps({"x": 1})


def test_sign_matches_waha_test_vector() -> None:
    body = b'{"event":"message","session":"default","engine":"WEBJS"}'
    assert wp.sign(body, "my-secret-key") == (
        "208f8a55dde9e05519e898b10b89bf0d0b3b0fdf11fdbf09b6b90476301b98d8"
        "097c462b2b17a6ce93b6b47a136cf2e78a33a63f6752c2c1631777076153fa89")
