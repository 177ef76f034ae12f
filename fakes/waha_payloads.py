"""Builders for WAHA webhook bodies shaped like the real ones, for the three engines (WEBJS, NOWEB, GOWS).

Pure data: no I/O, no network. Every builder returns the FULL envelope (``id``, ``timestamp``, ``event``,
``session``, ``metadata``, ``me``, ``payload``, ``engine``, ``environment``) as a plain ``dict``; turn it
into the exact bytes WAHA would POST with :func:`dumps` and sign them with :func:`sign`.

All phone numbers, ids and names are placeholders (``55119...`` / ``1000...@lid``); nothing is copied from
a real person.

Where the shapes come from (read these before changing anything):

Envelope / headers
  * OpenAPI 2026.7.1 ``WAHAWebhookMessage``/``WAHAEnvironment``/``MeInfo`` (fakes/data/waha-openapi.json).
  * Real GOWS 2025.11.2 body, key order id, timestamp, event, session, metadata, me{id,pushName,lid,jid},
    payload, engine, environment: https://github.com/devlikeapro/waha/issues/1627
  * Real NOWEB 2025.11.4 body (no ``metadata`` key at all, me{id,pushName,lid}):
    https://github.com/devlikeapro/waha/issues/1689 ; NOWEB 2025.10.2 (other key order, browser null):
    https://github.com/devlikeapro/waha/issues/1504 ; ``worker.id`` since 2026.1.4:
    https://github.com/devlikeapro/waha/issues/1840
WAHA's own conversion of each engine's raw object into ``payload`` (field presence, null vs missing):
  * NOWEB  https://github.com/devlikeapro/waha/blob/HEAD/src/core/engines/noweb/session.noweb.core.ts
    (toWAMessage, buildMessageId, getFromToParticipant, extractBody -> ``body || null``,
    convertMessageUpdateToMessageAck, processMessageReaction)
  * GOWS   https://github.com/devlikeapro/waha/blob/HEAD/src/core/engines/gows/session.gows.core.ts
    (toWAMessage, buildMessageId, getFromToParticipant -> ``to``/``participant`` = Sender in groups,
    null in DMs; getSourceDeviceByMsg -> ``source`` decided by the device part of ``Info.Sender``;
    receiptToMessageAck; messageResponse -> sendText answers ``{id, _data}``)
  * WEBJS  https://github.com/devlikeapro/waha/blob/HEAD/src/core/engines/webjs/session.webjs.core.ts
    (toWAMessage: ``_data = message.rawData``), whatsapp-web.js
    https://github.com/wwebjs/whatsapp-web.js/blob/main/src/structures/Message.js
  * media object ``{url, filename, mimetype}`` (+ ``error`` only on failure), url = ``<base>/api/files/
    <session>/<engine message id>.<ext>``:
    https://github.com/devlikeapro/waha/blob/HEAD/src/core/media/MediaManager.ts ,
    https://github.com/devlikeapro/waha/blob/HEAD/src/core/media/local/MediaLocalStorage.ts ,
    https://github.com/devlikeapro/waha/issues/1752 (real ``filename: null``),
    https://github.com/devlikeapro/waha/issues/510 and /issues/667 (``media.error`` shape)
  * location: ``latitude``/``longitude`` are STRINGS for NOWEB/GOWS (WAHA ``extractWALocation``,
    OpenAPI ``WALocation``); WEBJS passes whatsapp-web.js ``Location`` (numbers).
Raw engine objects (``_data``):
  * WEBJS rawData: docs example https://github.com/devlikeapro/waha/blob/HEAD/docs/site/content/en/docs/how-to/webhooks/index.md
    (+ ``self`` removed: https://github.com/devlikeapro/waha/issues/304); status ids
    ``false_status@broadcast_<id>_<sender>``: https://github.com/devlikeapro/waha/issues/1194 ;
    ``from: "...@lid"`` on WEBJS: https://github.com/devlikeapro/waha/issues/1849
  * NOWEB = Baileys WebMessageInfo: real bodies https://github.com/devlikeapro/waha/issues/1073 (DM from
    ``@lid``), /issues/1055 (group, ``participant`` ``@lid``), /issues/1689 (own API echo, ``status: 2``,
    ``addressingMode``), /issues/2010 (``remoteJidAlt``), /issues/172 (documentMessage, Long as string);
    key{remoteJid, remoteJidAlt, fromMe, id, participant, participantAlt, addressingMode}:
    Baileys ``decodeMessageNode`` https://github.com/WhiskeySockets/Baileys/blob/master/src/Utils/decode-wa-message.ts
    and https://github.com/WhiskeySockets/Baileys/issues/1810
  * GOWS = whatsmeow ``events.Message`` marshalled with Go ``encoding/json`` by
    https://github.com/devlikeapro/gows/blob/HEAD/src/server/events.go (so ``Info`` keys are Go field
    names, ``Message`` keys are protobuf json tags: ``conversation``, ``imageMessage.URL``,
    ``fileSHA256``, ``JPEGThumbnail``..., uint64 as numbers, bytes as base64), fields from
    https://github.com/tulir/whatsmeow/blob/main/types/message.go and types/events/events.go ;
    WAHA adds ``Status``. Real GOWS payload (``to: null``, ``participant: null``, 32-hex id):
    https://github.com/devlikeapro/waha/issues/1627
Duplicates: one message delivered once per ``@lid`` and once per ``@c.us``:
    https://github.com/devlikeapro/waha/issues/1309 (NOWEB), /issues/1627 and /issues/1816 (GOWS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from datetime import UTC, datetime
from types import EllipsisType
from typing import Any

__all__ = [
    "ACK_NAMES",
    "BASE_URL",
    "BOT_ID",
    "BOT_JID",
    "BOT_LID",
    "BOT_NAME",
    "BROADCAST_LIST_ID",
    "CUSTOMER_LID",
    "CUSTOMER_NAME",
    "CUSTOMER_PN",
    "ENGINES",
    "GROUP_ID",
    "NEWSLETTER_ID",
    "OTHER_LID",
    "OTHER_PN",
    "SESSION",
    "STATUS_ID",
    "WAHA_VERSION",
    "bare_message_id",
    "broadcast_list_message",
    "default_me",
    "dumps",
    "envelope",
    "environment",
    "lid_and_pn_pair",
    "location_message",
    "media_message",
    "message_ack",
    "new_event_id",
    "newsletter_message",
    "own_api_message_any",
    "own_app_message_any",
    "parse_message_id",
    "reaction",
    "seed",
    "serialize_message_id",
    "session_status",
    "sign",
    "status_broadcast_message",
    "text_message",
    "to_cus",
    "to_s_whatsapp",
]

# --------------------------------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------------------------------
ENGINES: tuple[str, str, str] = ("WEBJS", "NOWEB", "GOWS")
SESSION = "default"
WAHA_VERSION = "2026.7.1"
BASE_URL = "http://localhost:3000"

BOT_ID = "5511900000000@c.us"
BOT_LID = "100000000000001@lid"
BOT_DEVICE = 22  # the linked device WAHA runs as; GOWS uses it to tell API sends from phone sends
BOT_JID = f"5511900000000:{BOT_DEVICE}@s.whatsapp.net"
BOT_NAME = "Loja Exemplo"

CUSTOMER_PN = "5511988887777@c.us"
CUSTOMER_LID = "200000000000002@lid"
CUSTOMER_NAME = "Cliente Exemplo"
OTHER_PN = "5511977776666@c.us"
OTHER_LID = "200000000000003@lid"

GROUP_ID = "120363000000000001@g.us"
STATUS_ID = "status@broadcast"
NEWSLETTER_ID = "120363000000000099@newsletter"
BROADCAST_LIST_ID = "1717000000@broadcast"

ACK_NAMES: dict[int, str] = {-1: "ERROR", 0: "PENDING", 1: "SERVER", 2: "DEVICE", 3: "READ", 4: "PLAYED"}

# PN <-> LID pairs WhatsApp would report as the "alternative" address of the same account.
_ALT: dict[str, str] = {CUSTOMER_PN: CUSTOMER_LID, CUSTOMER_LID: CUSTOMER_PN, BOT_ID: BOT_LID, BOT_LID: BOT_ID,
                        OTHER_PN: OTHER_LID, OTHER_LID: OTHER_PN}
_NAMES: dict[str, str] = {CUSTOMER_PN: CUSTOMER_NAME, CUSTOMER_LID: CUSTOMER_NAME, BOT_ID: BOT_NAME,
                          BOT_LID: BOT_NAME, OTHER_PN: "Outra Pessoa", OTHER_LID: "Outra Pessoa"}

_DEFAULT_BODY = "Olá, qual o horário de funcionamento?"
# Generic JPEG header as a stand-in for the base64 thumbnails engines embed (jpegThumbnail, rawData.body).
_THUMB = "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgICAgMCAgIDAwMDBAYEBAQEBAgGBgUGCQgKCgkICQkKDA8MCgsOCwkJDRENDg8QEBEQCgwSExIQEw8QEBD/"
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_MIME_DEFAULTS: dict[str, str] = {"image": "image/jpeg", "audio": "audio/ogg; codecs=opus",
                                  "sticker": "image/webp", "document": "application/pdf"}
# mime-types' extension() for the mimetypes above (WAHA names stored files with it)
_EXTENSIONS: dict[str, str] = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp",
                               "audio/ogg; codecs=opus": "oga", "audio/ogg": "oga", "audio/mpeg": "mp3",
                               "audio/mp4": "m4a", "video/mp4": "mp4", "application/pdf": "pdf"}

_rng = random.Random()


def seed(value: int | None) -> None:
    """Make ids/hashes reproducible (``seed(1)``) or random again (``seed(None)``)."""
    _rng.seed(value)


# --------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def new_event_id(timestamp_ms: int | None = None) -> str:
    """``evt_`` + 26-char lower-case ULID (10 time chars + 16 random), like ``evt_01ka9a0x73vrx3aqra9rhjmfvy``."""
    ts = _now_ms() if timestamp_ms is None else timestamp_ms
    time_part = "".join(_CROCKFORD[(ts >> (5 * i)) & 31] for i in reversed(range(10)))
    return "evt_" + time_part + "".join(_rng.choice(_CROCKFORD) for _ in range(16))


def _hex(n: int) -> str:
    return "".join(_rng.choice("0123456789ABCDEF") for _ in range(n))


def bare_message_id(style: str = "web") -> str:
    """A WhatsApp message id as the sending device makes it.

    ``web``: WhatsApp Web / Baileys / whatsmeow sends (``3EB0`` + 18 hex, 22 chars), ``android``: 32 hex
    (e.g. ``AC2AB3184AC4AEB3E0527911B838398F`` in #1627), ``ios``: ``3A`` + 18 hex (20 chars, see #1194).
    """
    if style == "web":
        return "3EB0" + _hex(18)
    if style == "android":
        return "A" + _hex(31)
    if style == "ios":
        return "3A" + _hex(18)
    raise ValueError(f"unknown id style {style!r}")


def serialize_message_id(from_me: bool, chat: str, bare_id: str, participant: str | None = None) -> str:
    """WAHA's ``{fromMe}_{chatId}_{messageId}[_{participant}]``."""
    parts = ["true" if from_me else "false", chat, bare_id]
    if participant:
        parts.append(participant)
    return "_".join(parts)


def parse_message_id(serialized: str) -> tuple[bool, str, str, str | None]:
    """Inverse of :func:`serialize_message_id` -> ``(from_me, chat, bare_id, participant|None)``."""
    parts = serialized.split("_")
    if len(parts) not in (3, 4) or parts[0] not in ("true", "false"):
        raise ValueError(f"not a WAHA message id: {serialized!r}")
    return parts[0] == "true", parts[1], parts[2], parts[3] if len(parts) == 4 else None


def to_s_whatsapp(jid: str | None, device: int | None = None) -> str | None:
    """``5511...@c.us`` -> ``5511...@s.whatsapp.net`` (engine-internal form); other servers unchanged."""
    if not jid:
        return jid
    user, _, server = jid.partition("@")
    user = user.split(":")[0]
    dev = f":{device}" if device else ""
    if server in ("c.us", "s.whatsapp.net"):
        return f"{user}{dev}@s.whatsapp.net"
    if server == "lid":
        return f"{user}{dev}@lid"
    return jid


def to_cus(jid: str | None) -> str | None:
    """WAHA ``toCusFormat``: ``...@s.whatsapp.net`` / ``...:12@s.whatsapp.net`` -> ``...@c.us``, lid without device."""
    if not jid:
        return jid
    user, _, server = jid.partition("@")
    if server in ("c.us", "s.whatsapp.net"):
        return f"{user.split(':')[0]}@c.us"
    if server == "lid":
        return f"{user.split(':')[0]}@lid"
    return jid


def _is_group_like(jid: str) -> bool:
    """Chats whose messages carry a participant (groups, Status, broadcast lists)."""
    return jid.endswith("@g.us") or jid.endswith("@broadcast")


def _b64(n: int = 32) -> str:
    return base64.b64encode(_rng.randbytes(n)).decode()


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alt(jid: str, override: str | EllipsisType | None) -> str | None:
    return _ALT.get(jid) if override is ... else override


# --------------------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------------------
def default_me(engine: str) -> dict[str, Any]:
    """``me`` as each engine fills it in 2026.7.1: GOWS adds ``jid`` (#1627), NOWEB has ``lid`` (#1689),
    WEBJS got ``lid`` in 2026.7.1 (changelog)."""
    me: dict[str, Any] = {"id": BOT_ID, "pushName": BOT_NAME, "lid": BOT_LID}
    if engine == "GOWS":
        me["jid"] = BOT_JID
    return me


def environment(engine: str, *, version: str = WAHA_VERSION, tier: str = "CORE") -> dict[str, Any]:
    return {"version": version, "engine": engine, "tier": tier,
            "browser": "/usr/bin/chromium" if engine == "WEBJS" else None,
            "platform": "linux/x64", "worker": {"id": None}}


def envelope(event: str, payload: dict[str, Any], *, engine: str = "WEBJS", session: str = SESSION,
             event_id: str | None = None, me: dict[str, Any] | EllipsisType | None = ...,
             timestamp_ms: int | None = None,
             metadata: dict[str, Any] | EllipsisType | None = None) -> dict[str, Any]:
    """The webhook body. ``me=None`` leaves ``me`` out (not authenticated yet); ``metadata=...`` leaves
    ``metadata`` out (seen on NOWEB 2025.11.4, #1689); ``metadata=None`` (default) sends ``{}``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    ts = _now_ms() if timestamp_ms is None else timestamp_ms
    body: dict[str, Any] = {"id": event_id or new_event_id(ts), "timestamp": ts, "event": event,
                            "session": session}
    if metadata is not ...:
        body["metadata"] = {} if metadata is None else metadata
    if me is ...:
        body["me"] = default_me(engine)
    elif me is not None:
        body["me"] = me
    body["payload"] = payload
    body["engine"] = engine
    body["environment"] = environment(engine)
    return body


# --------------------------------------------------------------------------------------------------
# Message model shared by the engines
# --------------------------------------------------------------------------------------------------
class _Msg:
    """What WhatsApp delivered, before each engine serialises it its own way."""

    def __init__(self, engine: str, *, chat: str, sender: str, from_me: bool, source: str, bare_id: str,
                 ts: int, content: dict[str, Any], push_name: str | None, sender_alt: str | None,
                 reply_to: dict[str, Any] | None, session: str, sender_device: int | None = None,
                 device_sent: bool = False, server_id: int | None = None) -> None:
        self.engine, self.chat, self.sender, self.from_me, self.source = engine, chat, sender, from_me, source
        self.bare_id, self.ts, self.content, self.push_name = bare_id, ts, content, push_name
        self.sender_alt, self.reply_to, self.session = sender_alt, reply_to, session
        self.sender_device, self.device_sent, self.server_id = sender_device, device_sent, server_id

    @property
    def group_like(self) -> bool:
        return _is_group_like(self.chat)

    @property
    def kind(self) -> str:
        return self.content["kind"]

    @property
    def has_media(self) -> bool:
        return self.kind in _MIME_DEFAULTS

    @property
    def caption(self) -> str | None:
        return self.content.get("caption")


def _ack_for(m: _Msg) -> int:
    if m.engine == "WEBJS":
        return 1
    return 1 if m.from_me else 2  # NOWEB/GOWS: own = SERVER (status 2), incoming = DEVICE (#1073, #1689)


def _media_object(m: _Msg, file_id: str, *, download: bool,
                  media_error: dict[str, Any] | EllipsisType | None) -> dict[str, Any] | None:
    if not m.has_media or not download:
        return None
    mimetype = m.content["mimetype"]
    filename = m.content.get("filename") if m.kind == "document" else None
    if isinstance(media_error, dict):
        return {"url": None, "filename": filename, "mimetype": mimetype, "error": media_error}
    media: dict[str, Any] = {"url": f"{BASE_URL}/api/files/{m.session}/{file_id}.{_EXTENSIONS.get(mimetype, 'bin')}",
                             "filename": filename, "mimetype": mimetype}
    if media_error is None:
        media["error"] = None  # OpenAPI example shape; the real success object has no "error" key at all
    return media


def _wa_location(m: _Msg) -> dict[str, Any] | None:
    """NOWEB/GOWS payload.location (WAHA extractWALocation): coordinates as strings, absent keys dropped."""
    if m.kind != "location":
        return None
    c = m.content
    loc: dict[str, Any] = {"live": False, "latitude": repr(float(c["latitude"])),
                           "longitude": repr(float(c["longitude"]))}
    for key in ("name", "address", "url"):
        if c.get(key):
            loc[key] = c[key]
    if c.get("comment"):
        loc["description"] = c["comment"]
    loc["thumbnail"] = _THUMB
    return loc


def _cdn() -> tuple[str, str]:
    path = f"/o1/v/t62.7118-24/f2/m231/AQ{_hex(40)}?ccb=9-4&oh=01_Q5Aa{_hex(30)}&oe=6900A1B2&_nc_sid=e6ed6c"
    return "https://mmg.whatsapp.net" + path + "&mms3=true", path


# ---------------------------------------------------------------------------------------------- NOWEB
def _noweb_context_info() -> dict[str, Any]:
    return {"deviceListMetadata": {"senderKeyHash": _b64(10), "senderTimestamp": str(1_731_000_000),
                                   "recipientKeyHash": _b64(10), "recipientTimestamp": str(1_732_000_000)},
            "deviceListMetadataVersion": 2, "messageSecret": _b64(32)}


def _noweb_media(kind: str, c: dict[str, Any]) -> dict[str, Any]:
    url, direct = _cdn()
    common = {"url": url, "mimetype": c["mimetype"], "fileSha256": _b64(), "fileLength": str(_rng.randint(9_000, 900_000)),
              "mediaKey": _b64(), "fileEncSha256": _b64(), "directPath": direct, "mediaKeyTimestamp": str(1_731_000_000)}
    if kind == "image":
        msg = {**common, "height": 1280, "width": 960, "jpegThumbnail": _THUMB}
        if c.get("caption"):
            msg["caption"] = c["caption"]
        return {"imageMessage": msg}
    if kind == "audio":
        return {"audioMessage": {**common, "seconds": 7, "ptt": True, "waveform": _b64(64)}}
    if kind == "sticker":
        return {"stickerMessage": {**common, "height": 512, "width": 512, "isAnimated": False, "isAvatar": False,
                                   "isAiSticker": False, "isLottie": False}}
    doc = {**common, "title": c["filename"], "pageCount": 1, "fileName": c["filename"], "jpegThumbnail": _THUMB}
    if c.get("caption"):  # phones wrap captioned documents
        return {"documentWithCaptionMessage": {"message": {"documentMessage": {**doc, "caption": c["caption"]}}}}
    return {"documentMessage": doc}


def _noweb_message(m: _Msg) -> dict[str, Any]:
    c = m.content
    if m.kind == "text":
        if m.reply_to:
            rt = m.reply_to
            ctx = {"stanzaId": rt["id"], "participant": to_s_whatsapp(rt.get("participant") or BOT_ID),
                   "quotedMessage": {"conversation": rt.get("body", "")}}
            msg: dict[str, Any] = {"extendedTextMessage": {"text": c["body"], "contextInfo": ctx}}
        elif m.from_me and m.source == "api":
            msg = {"extendedTextMessage": {"text": c["body"]}}  # Baileys always sends {text} as extendedTextMessage
        elif c.get("status_text"):
            msg = {"extendedTextMessage": {"text": c["body"], "backgroundArgb": 4283190348, "font": "SYSTEM",
                                           "previewType": "NONE"}}
        else:
            msg = {"conversation": c["body"]}
    elif m.kind == "location":
        loc: dict[str, Any] = {"degreesLatitude": c["latitude"], "degreesLongitude": c["longitude"]}
        for key in ("name", "address"):
            if c.get(key):
                loc[key] = c[key]
        loc["jpegThumbnail"] = _THUMB
        msg = {"locationMessage": loc}
    else:
        msg = _noweb_media(m.kind, c)
    if not (m.from_me and m.source == "api"):
        msg["messageContextInfo"] = _noweb_context_info()
    return msg


def _noweb_key(m: _Msg) -> dict[str, Any]:
    remote = to_s_whatsapp(m.chat)
    key: dict[str, Any] = {"remoteJid": remote}
    own_api = m.from_me and m.source == "api"
    # DMs: the alternative address of the sender (LID <-> PN); only for incoming messages here
    if not m.group_like and not m.from_me and m.sender_alt and not m.chat.endswith("@newsletter"):
        key["remoteJidAlt"] = to_s_whatsapp(m.sender_alt)
    key["fromMe"] = m.from_me
    key["id"] = m.bare_id
    if m.group_like and not own_api:
        key["participant"] = to_s_whatsapp(m.sender)
        if m.sender_alt:
            key["participantAlt"] = to_s_whatsapp(m.sender_alt)
    if not own_api:
        key["addressingMode"] = "lid" if (m.sender.endswith("@lid")) else "pn"
    if m.server_id is not None:
        key["server_id"] = str(m.server_id)
    return key


def _noweb_payload(m: _Msg, *, download: bool, media_error: Any) -> dict[str, Any]:
    key = _noweb_key(m)
    data: dict[str, Any] = {"key": key, "messageTimestamp": m.ts}
    if m.push_name is not None:
        data["pushName"] = m.push_name
    data["broadcast"] = m.chat.endswith("@broadcast")
    if m.from_me:
        data["status"] = 2  # SERVER_ACK, set by Baileys for fromMe keys (#1689)
    data["message"] = _noweb_message(m)
    participant = key.get("participant")
    payload: dict[str, Any] = {
        "id": serialize_message_id(m.from_me, to_cus(key["remoteJid"]), m.bare_id, to_cus(participant)),
        "timestamp": m.ts, "from": to_cus(key["remoteJid"]), "fromMe": m.from_me, "source": m.source,
        "body": _body_text(m) or None,  # NOWEB: `body || null` -> null for voice/sticker/location
    }
    if participant:  # `to`/`participant` are undefined (key absent) in DMs
        payload["to"] = to_cus(key["remoteJid"])
        payload["participant"] = to_cus(participant)
    ack = _ack_for(m)
    payload.update({"hasMedia": m.has_media,
                    "media": _media_object(m, m.bare_id, download=download, media_error=media_error),
                    "ack": ack, "ackName": ACK_NAMES[ack], "location": _wa_location(m), "vCards": None,
                    "replyTo": _noweb_gows_reply_to(m), "_data": data})
    return payload


def _noweb_gows_reply_to(m: _Msg) -> dict[str, Any] | None:
    if not m.reply_to:
        return None
    rt = m.reply_to
    quoted = {"conversation": rt.get("body", "")}
    return {"id": rt["id"], "participant": to_cus(to_s_whatsapp(rt.get("participant") or BOT_ID)),
            "body": rt.get("body", ""), "hasMedia": False, "media": None, "_data": quoted}


def _body_text(m: _Msg) -> str | None:
    if m.kind == "text":
        return m.content["body"]
    if m.kind in ("image", "document"):
        return m.caption
    return None


# ----------------------------------------------------------------------------------------------- GOWS
def _gows_media(kind: str, c: dict[str, Any]) -> dict[str, Any]:
    url, direct = _cdn()
    common = {"URL": url, "mimetype": c["mimetype"], "fileSHA256": _b64(), "fileLength": _rng.randint(9_000, 900_000),
              "mediaKey": _b64(), "fileEncSHA256": _b64(), "directPath": direct, "mediaKeyTimestamp": 1_731_000_000}
    if kind == "image":
        msg = {**common, "height": 1280, "width": 960, "JPEGThumbnail": _THUMB}
        if c.get("caption"):
            msg["caption"] = c["caption"]
        return {"imageMessage": msg}
    if kind == "audio":
        return {"audioMessage": {**common, "seconds": 7, "PTT": True, "waveform": _b64(64)}}
    if kind == "sticker":
        return {"stickerMessage": {**common, "height": 512, "width": 512, "isAnimated": False, "isAvatar": False,
                                   "isAiSticker": False, "isLottie": False}}
    doc = {**common, "title": c["filename"], "pageCount": 1, "fileName": c["filename"], "JPEGThumbnail": _THUMB}
    if c.get("caption"):
        doc["caption"] = c["caption"]
    return {"documentMessage": doc}


def _gows_message(m: _Msg) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(Message, RawMessage, IsDocumentWithCaption): whatsmeow unwraps wrappers into Message, keeps RawMessage."""
    c = m.content
    wrapped_doc = False
    if m.kind == "text":
        if m.reply_to:
            rt = m.reply_to
            ctx = {"stanzaID": rt["id"], "participant": to_s_whatsapp(rt.get("participant") or BOT_ID),
                   "quotedMessage": {"conversation": rt.get("body", "")}}
            msg: dict[str, Any] = {"extendedTextMessage": {"text": c["body"], "contextInfo": ctx}}
        elif m.from_me and m.source == "api":
            msg = {"extendedTextMessage": {"text": c["body"]}}  # gows SendMessage builds ExtendedTextMessage
        elif c.get("status_text"):
            msg = {"extendedTextMessage": {"text": c["body"], "backgroundArgb": 4283190348, "font": 1}}
        else:
            msg = {"conversation": c["body"]}
    elif m.kind == "location":
        loc: dict[str, Any] = {"degreesLatitude": c["latitude"], "degreesLongitude": c["longitude"]}
        for key in ("name", "address"):
            if c.get(key):
                loc[key] = c[key]
        loc["JPEGThumbnail"] = _THUMB
        msg = {"locationMessage": loc}
    else:
        msg = _gows_media(m.kind, c)
        wrapped_doc = m.kind == "document" and bool(c.get("caption"))
    if not (m.from_me and m.source == "api"):
        msg["messageContextInfo"] = {
            "deviceListMetadata": {"senderKeyHash": _b64(10), "senderTimestamp": 1_731_000_000,
                                   "recipientKeyHash": _b64(10), "recipientTimestamp": 1_732_000_000},
            "deviceListMetadataVersion": 2, "messageSecret": _b64(32)}
    raw: dict[str, Any] = msg
    if wrapped_doc:
        raw = {"documentWithCaptionMessage": {"message": msg}}
    if m.device_sent:
        raw = {"deviceSentMessage": {"destinationJID": to_s_whatsapp(m.chat), "message": raw,
                                     "phash": "2:" + _b64(6)}}
    return msg, raw, wrapped_doc


_GOWS_MEDIA_TYPE = {"text": "", "image": "image", "audio": "ptt", "sticker": "sticker", "document": "document",
                    "location": "location"}


def _gows_info(m: _Msg) -> dict[str, Any]:
    sender = to_s_whatsapp(m.sender, m.sender_device)
    return {
        "Chat": to_s_whatsapp(m.chat), "Sender": sender, "IsFromMe": m.from_me,
        # whatsmeow: IsGroup "Whether the chat is a group chat or broadcast list" (status@broadcast too)
        "IsGroup": m.group_like,
        "AddressingMode": "lid" if m.sender.endswith("@lid") else "pn",
        "SenderAlt": to_s_whatsapp(m.sender_alt) or "", "RecipientAlt": "",
        "BroadcastListOwner": "", "BroadcastRecipients": None,
        "ID": m.bare_id, "ServerID": m.server_id or 0,
        "Type": "text" if m.kind == "text" else "media", "PushName": m.push_name or "",
        "Timestamp": _rfc3339(m.ts), "Category": "", "Multicast": False,
        "MediaType": _GOWS_MEDIA_TYPE[m.kind], "Edit": "",
        "MsgBotInfo": {"EditType": "", "EditTargetID": "", "EditSenderTimestampMS": "0001-01-01T00:00:00Z",
                       "ClientThreadID": ""},
        "MsgMetaInfo": {"TargetID": "", "TargetSender": "", "TargetChat": "", "DeprecatedLIDSession": None,
                        "ThreadMessageID": "", "ThreadMessageSenderJID": ""},
        "IsNewsletterStatus": False, "VerifiedName": None,
        "DeviceSentMeta": ({"DestinationJID": to_s_whatsapp(m.chat), "Phash": "2:" + _b64(6)}
                           if m.device_sent else None),
    }


def _gows_payload(m: _Msg, *, download: bool, media_error: Any) -> dict[str, Any]:
    info = _gows_info(m)
    message, raw, wrapped_doc = _gows_message(m)
    data: dict[str, Any] = {
        "Info": info, "Message": message, "IsEphemeral": False, "IsViewOnce": False, "IsViewOnceV2": False,
        "IsViewOnceV2Extension": False, "IsDocumentWithCaption": wrapped_doc, "IsLottieSticker": False,
        "IsBotInvoke": False, "IsEdit": False, "SourceWebMsg": None, "UnavailableRequestID": "", "RetryCount": 0,
        "NewsletterMeta": ({"EditTS": "0001-01-01T00:00:00Z", "OriginalTS": "0001-01-01T00:00:00Z"}
                           if m.chat.endswith("@newsletter") else None),
        "RawMessage": raw,
        # WAHA sets Status before converting: ServerAck for own, DeliveryAck for others
        "Status": 2 if m.from_me else 3,
    }
    participant = to_cus(info["Sender"]) if info["IsGroup"] else None
    payload: dict[str, Any] = {
        "id": serialize_message_id(m.from_me, to_cus(info["Chat"]), m.bare_id, participant),
        "timestamp": m.ts, "from": to_cus(info["Chat"]), "fromMe": m.from_me, "source": m.source,
    }
    body = _body_text(m)
    if body is not None:  # extractBody() returns undefined for voice/sticker/location -> key dropped
        payload["body"] = body
    ack = _ack_for(m)
    payload.update({"to": participant, "participant": participant, "hasMedia": m.has_media,
                    "media": _media_object(m, m.bare_id, download=download, media_error=media_error),
                    "ack": ack, "location": _wa_location(m), "vCards": None, "ackName": ACK_NAMES[ack],
                    "replyTo": _noweb_gows_reply_to(m), "_data": data})
    return payload


# ---------------------------------------------------------------------------------------------- WEBJS
_WEBJS_TYPE = {"text": "chat", "image": "image", "audio": "ptt", "sticker": "sticker", "document": "document",
               "location": "location"}


def _webjs_raw(m: _Msg, serialized: str, frm: str, to: str) -> dict[str, Any]:
    c = m.content
    msg_id: dict[str, Any] = {"fromMe": m.from_me, "remote": m.chat, "id": m.bare_id}
    if m.group_like:
        msg_id["participant"] = BOT_ID if m.from_me else m.sender
    msg_id["_serialized"] = serialized
    raw: dict[str, Any] = {"id": msg_id, "viewed": False}
    kind = m.kind
    if kind == "text":
        raw["body"] = c["body"]
    else:
        # WhatsApp Web keeps the base64 thumbnail in `body` for media/location (payload.body is the caption)
        raw["body"] = _THUMB if kind in ("image", "document", "location") else ""
    raw["type"] = _WEBJS_TYPE[kind]
    raw["t"] = m.ts
    raw["notifyName"] = m.push_name or ""
    raw["from"] = frm
    raw["to"] = to
    if m.group_like:
        raw["author"] = msg_id["participant"]
    raw["ack"] = 1
    if m.has_media:
        _, direct = _cdn()
        raw.update({"deprecatedMms3Url": "https://mmg.whatsapp.net" + direct, "directPath": direct,
                    "mimetype": c["mimetype"], "filehash": _b64(), "encFilehash": _b64(),
                    "size": _rng.randint(9_000, 900_000), "mediaKey": _b64(), "mediaKeyTimestamp": 1_731_000_000,
                    "isViewOnce": False})
        if kind in ("image", "sticker"):
            raw.update({"width": 960 if kind == "image" else 512, "height": 1280 if kind == "image" else 512})
        if kind == "audio":
            raw["duration"] = "7"
        if kind == "document":
            raw.update({"filename": c["filename"], "pageCount": 1, "size": 48213})
        if c.get("caption"):
            raw["caption"] = c["caption"]
    if kind == "location":
        raw.update({"lat": c["latitude"], "lng": c["longitude"]})
        if c.get("name") or c.get("address"):
            raw["loc"] = "\n".join(x for x in (c.get("name"), c.get("address")) if x)
    if m.reply_to:
        rt = m.reply_to
        raw.update({"quotedMsg": {"type": "chat", "body": rt.get("body", "")}, "quotedStanzaID": rt["id"],
                    "quotedParticipant": rt.get("participant") or BOT_ID})
    raw.update({"invis": False, "isNewMsg": True, "star": False, "kicNotified": False, "recvFresh": True,
                "isFromTemplate": False, "pollInvalidated": False, "isSentCagPollCreation": False,
                "latestEditMsgKey": None, "latestEditSenderTimestampMs": None, "mentionedJidList": [],
                "groupMentions": [], "isEventCanceled": False, "eventInvalidated": False,
                "isVcardOverMmsDocument": False, "isForwarded": False, "hasReaction": False, "viewMode": "VISIBLE",
                "productHeaderImageRejected": False, "lastPlaybackProgress": 0, "isDynamicReplyButtonsMsg": False,
                "isCarouselCard": False, "parentMsgId": None, "isMdHistoryMsg": False, "stickerSentTs": 0,
                "isAvatar": False, "lastUpdateFromServerTs": 0, "invokedBotWid": None, "bizBotType": None,
                "botResponseTargetId": None, "botPluginType": None, "botPluginReferenceIndex": None,
                "botPluginSearchProvider": None, "botPluginSearchUrl": None, "botPluginSearchQuery": None,
                "botPluginMaybeParent": False, "botReelPluginThumbnailCdnUrl": None, "botMsgBodyType": None,
                "requiresDirectConnection": False, "bizContentPlaceholderType": None,
                "hostedBizEncStateMismatch": False, "senderOrRecipientAccountTypeHosted": False,
                "placeholderCreatedWhenAccountIsHosted": False, "links": []})
    return raw


def _webjs_payload(m: _Msg, *, download: bool, media_error: Any) -> dict[str, Any]:
    # whatsapp-web.js: `from` is the chat, "except if the message was sent by the current user" -> then
    # from = me and `to` = the chat.
    frm, to = (BOT_ID, m.chat) if m.from_me else (m.chat, BOT_ID)
    participant = (BOT_ID if m.from_me else m.sender) if m.group_like else None
    serialized = serialize_message_id(m.from_me, m.chat, m.bare_id, participant)
    raw = _webjs_raw(m, serialized, frm, to)
    payload: dict[str, Any] = {"id": serialized, "timestamp": m.ts, "from": frm, "fromMe": m.from_me,
                               "source": m.source, "to": to}
    if participant:  # message.author is undefined in DMs -> key dropped
        payload["participant"] = participant
    body = _body_text(m)
    payload["body"] = body if body is not None else ""  # whatsapp-web.js: caption || '' for media
    media = _media_object(m, serialized, download=download, media_error=media_error)
    payload["hasMedia"] = m.has_media
    payload["media"] = media
    if media and media.get("url"):
        payload["mediaUrl"] = media["url"]  # deprecated, WEBJS only
    payload["ack"] = 1
    payload["ackName"] = ACK_NAMES[1]
    if m.kind == "location":
        c = m.content
        loc: dict[str, Any] = {"latitude": c["latitude"], "longitude": c["longitude"]}
        if c.get("name"):
            loc["name"] = c["name"]
        if c.get("address"):
            loc["address"] = c["address"]
        loc["description"] = "\n".join(x for x in (c.get("name"), c.get("address")) if x)
        payload["location"] = loc  # absent (undefined) for non-location messages
    payload["vCards"] = []
    if m.reply_to:
        rt = m.reply_to
        # quotedMsg has no id in WhatsApp Web -> `id` missing ("not always available", docs)
        payload["replyTo"] = {"participant": rt.get("participant") or BOT_ID, "body": rt.get("body", "")}
    else:
        payload["replyTo"] = None
    payload["_data"] = raw
    return payload


_BUILDERS = {"WEBJS": _webjs_payload, "NOWEB": _noweb_payload, "GOWS": _gows_payload}


def _default_bare_id(engine: str, *, own_api: bool = False) -> str:
    if own_api:
        return bare_message_id("web")  # whatsapp-web.js, Baileys generateMessageIDV2, whatsmeow: 3EB0...
    return bare_message_id("web" if engine == "WEBJS" else "android")


def _build(engine: str, *, event: str, chat: str, sender: str, from_me: bool, source: str, content: dict[str, Any],
           message_id: str | None, timestamp: int | None, session: str, event_id: str | None,
           timestamp_ms: int | None, me: Any, push_name: str | EllipsisType | None = ...,
           sender_alt: str | EllipsisType | None = ..., reply_to: dict[str, Any] | None = None,
           download: bool = True, media_error: Any = ..., sender_device: int | None = None,
           device_sent: bool = False, server_id: int | None = None) -> dict[str, Any]:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    ts_ms = _now_ms() if timestamp_ms is None else timestamp_ms
    ts = timestamp if timestamp is not None else ts_ms // 1000 - 1
    bare = message_id or _default_bare_id(engine, own_api=from_me and source == "api")
    name = _NAMES.get(sender, CUSTOMER_NAME) if push_name is ... else push_name
    m = _Msg(engine, chat=chat, sender=sender, from_me=from_me, source=source, bare_id=bare, ts=ts, content=content,
             push_name=name, sender_alt=_alt(sender, sender_alt), reply_to=reply_to, session=session,
             sender_device=sender_device, device_sent=device_sent, server_id=server_id)
    payload = _BUILDERS[engine](m, download=download, media_error=media_error)
    return envelope(event, payload, engine=engine, session=session, event_id=event_id, me=me, timestamp_ms=ts_ms)


# --------------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------------
def text_message(engine: str = "WEBJS", *, body: str = _DEFAULT_BODY, sender: str = CUSTOMER_PN,
                 message_id: str | None = None, from_me: bool = False, source: str = "app",
                 timestamp: int | None = None, event: str = "message", session: str = SESSION,
                 group: str | None = None, reply_to: dict[str, Any] | None = None, event_id: str | None = None,
                 timestamp_ms: int | None = None, me: dict[str, Any] | EllipsisType | None = ...,
                 push_name: str | EllipsisType | None = ...,
                 sender_alt: str | EllipsisType | None = ...) -> dict[str, Any]:
    """A text message from ``sender`` (``@c.us`` or ``@lid``) in a DM, or in ``group`` when given.

    ``message_id`` is the bare WhatsApp id (default: engine-typical random); ``timestamp`` is payload
    seconds (default: envelope time - 1 s). ``reply_to={"id": bare_id, "participant": jid, "body": str}``
    quotes an earlier message. With ``from_me=True`` the message is the bot's own and ``sender`` names the
    chat it was written in. ``sender_alt`` overrides the PN<->LID alternative (None = unknown).
    """
    chat = group or sender
    real_sender = BOT_ID if from_me else sender
    return _build(engine, event=event, chat=chat, sender=real_sender, from_me=from_me, source=source,
                  content={"kind": "text", "body": body}, message_id=message_id, timestamp=timestamp,
                  session=session, event_id=event_id, timestamp_ms=timestamp_ms, me=me,
                  push_name=push_name, sender_alt=sender_alt, reply_to=reply_to,
                  sender_device=BOT_DEVICE if from_me and source == "api" else None)


def media_message(engine: str = "WEBJS", *, caption: str | None = None, mimetype: str | None = None,
                  kind: str = "image", filename: str | None = None, sender: str = CUSTOMER_PN,
                  message_id: str | None = None, timestamp: int | None = None, event: str = "message",
                  session: str = SESSION, group: str | None = None, event_id: str | None = None,
                  timestamp_ms: int | None = None, me: dict[str, Any] | EllipsisType | None = ...,
                  download: bool = True, media_error: dict[str, Any] | EllipsisType | None = ...) -> dict[str, Any]:
    """``kind``: ``image`` | ``audio`` (voice note, PTT) | ``sticker`` | ``document``.

    ``body`` follows the engine: WEBJS ``caption or ""``; NOWEB ``caption or null``; GOWS has NO ``body`` key
    when there is no caption. ``download=False`` gives ``hasMedia: true, media: null`` (downloads disabled);
    ``media_error={...}`` gives the failed-download object (``url: null`` + ``error``); ``media_error=None``
    adds ``"error": null`` like the OpenAPI example (the real success object has no ``error`` key).
    """
    if kind not in _MIME_DEFAULTS:
        raise ValueError(f"unknown media kind {kind!r}")
    mime = mimetype or _MIME_DEFAULTS[kind]
    content: dict[str, Any] = {"kind": kind, "mimetype": mime,
                               "caption": caption if kind in ("image", "document") else None}
    if kind == "document":
        content["filename"] = filename or "catalogo.pdf"
    return _build(engine, event=event, chat=group or sender, sender=sender, from_me=False, source="app",
                  content=content, message_id=message_id, timestamp=timestamp, session=session,
                  event_id=event_id, timestamp_ms=timestamp_ms, me=me, download=download, media_error=media_error)


def location_message(engine: str = "WEBJS", *, latitude: float = -23.5505, longitude: float = -46.6333,
                     name: str | None = None, address: str | None = None, sender: str = CUSTOMER_PN,
                     message_id: str | None = None, timestamp: int | None = None, event: str = "message",
                     session: str = SESSION, group: str | None = None, event_id: str | None = None,
                     timestamp_ms: int | None = None) -> dict[str, Any]:
    """A shared location. ``body``: WEBJS ``""``, NOWEB ``null``, GOWS key absent."""
    content = {"kind": "location", "latitude": latitude, "longitude": longitude, "name": name, "address": address}
    return _build(engine, event=event, chat=group or sender, sender=sender, from_me=False, source="app",
                  content=content, message_id=message_id, timestamp=timestamp, session=session,
                  event_id=event_id, timestamp_ms=timestamp_ms, me=...)


def status_broadcast_message(engine: str = "WEBJS", *, body: str = "Promoção de hoje!", sender: str = CUSTOMER_PN,
                             message_id: str | None = None, event: str = "message",
                             session: str = SESSION, event_id: str | None = None,
                             timestamp_ms: int | None = None) -> dict[str, Any]:
    """A contact's Status (story) post: ``from: "status@broadcast"``, ``participant`` = the poster,
    id ``false_status@broadcast_<id>_<poster>`` (#1194)."""
    return _build(engine, event=event, chat=STATUS_ID, sender=sender, from_me=False, source="app",
                  content={"kind": "text", "body": body, "status_text": True}, message_id=message_id,
                  timestamp=None, session=session, event_id=event_id, timestamp_ms=timestamp_ms, me=...)


def newsletter_message(engine: str = "WEBJS", *, body: str = "Novidades do canal", newsletter: str = NEWSLETTER_ID,
                       message_id: str | None = None, server_id: int = 143, event: str = "message",
                       session: str = SESSION, event_id: str | None = None,
                       timestamp_ms: int | None = None) -> dict[str, Any]:
    """A post in a followed channel: ``from: "...@newsletter"``, no participant."""
    return _build(engine, event=event, chat=newsletter, sender=newsletter, from_me=False, source="app",
                  content={"kind": "text", "body": body}, message_id=message_id or bare_message_id("web"),
                  timestamp=None, session=session, event_id=event_id, timestamp_ms=timestamp_ms, me=...,
                  push_name=None, sender_alt=None, server_id=server_id)


def broadcast_list_message(engine: str = "WEBJS", *, body: str = "Mensagem para a lista",
                           broadcast_list: str = BROADCAST_LIST_ID, sender: str = CUSTOMER_PN,
                           message_id: str | None = None, event: str = "message", session: str = SESSION,
                           event_id: str | None = None, timestamp_ms: int | None = None) -> dict[str, Any]:
    """A message someone sent to one of their broadcast lists: ``from: "<n>@broadcast"``, participant = sender."""
    return _build(engine, event=event, chat=broadcast_list, sender=sender, from_me=False, source="app",
                  content={"kind": "text", "body": body}, message_id=message_id, timestamp=None,
                  session=session, event_id=event_id, timestamp_ms=timestamp_ms, me=...)


def own_api_message_any(engine: str = "WEBJS", *, chat: str = CUSTOMER_PN,
                        body: str = "Funcionamos de segunda a sexta, das 9h às 18h.", message_id: str | None = None,
                        session: str = SESSION, event_id: str | None = None,
                        timestamp_ms: int | None = None) -> dict[str, Any]:
    """``message.any`` echo of the bot's own ``POST /api/sendText``: ``fromMe: true``, ``source: "api"``."""
    return _build(engine, event="message.any", chat=chat, sender=BOT_ID, from_me=True, source="api",
                  content={"kind": "text", "body": body}, message_id=message_id, timestamp=None, session=session,
                  event_id=event_id, timestamp_ms=timestamp_ms, me=..., push_name=BOT_NAME,
                  sender_alt=BOT_LID, sender_device=BOT_DEVICE)


def own_app_message_any(engine: str = "WEBJS", *, chat: str = CUSTOMER_PN, body: str = "Oi! Aqui é o atendente.",
                        message_id: str | None = None, session: str = SESSION, event_id: str | None = None,
                        timestamp_ms: int | None = None) -> dict[str, Any]:
    """``message.any`` for a human answering from the phone: ``fromMe: true``, ``source: "app"``.

    GOWS marks it with ``DeviceSentMeta`` and ``Info.Sender`` on device 0 (WAHA compares the device part
    with ``me.jid`` to pick api/app)."""
    return _build(engine, event="message.any", chat=chat, sender=BOT_ID, from_me=True, source="app",
                  content={"kind": "text", "body": body}, message_id=message_id or bare_message_id("android"),
                  timestamp=None, session=session, event_id=event_id, timestamp_ms=timestamp_ms, me=...,
                  push_name=BOT_NAME, sender_alt=BOT_LID, device_sent=True)


def message_ack(engine: str = "WEBJS", *, chat: str = CUSTOMER_PN, message_id: str | None = None, ack: int = 3,
                session: str = SESSION, event_id: str | None = None,
                timestamp_ms: int | None = None) -> dict[str, Any]:
    """``message.ack`` for one of the bot's messages in a DM (default READ)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    ts_ms = _now_ms() if timestamp_ms is None else timestamp_ms
    bare = message_id or bare_message_id("web")
    sid = serialize_message_id(True, chat, bare)
    payload: dict[str, Any]
    if engine == "NOWEB":  # convertMessageUpdateToMessageAck: to/participant undefined in DMs (#1504)
        payload = {"id": sid, "from": chat, "fromMe": True, "ack": ack, "ackName": ACK_NAMES[ack]}
    elif engine == "GOWS":  # receiptToMessageAck: explicit nulls + whatsmeow events.Receipt as _data
        receipt_type = {-1: "server-error", 2: "", 3: "read", 4: "played"}.get(ack, "")
        receipt = {"Chat": to_s_whatsapp(chat), "Sender": to_s_whatsapp(chat), "IsFromMe": False, "IsGroup": False,
                   "AddressingMode": "", "SenderAlt": "", "RecipientAlt": "", "BroadcastListOwner": "",
                   "BroadcastRecipients": None, "MessageIDs": [bare], "Timestamp": _rfc3339(ts_ms // 1000),
                   "Type": receipt_type, "MessageSender": ""}
        payload = {"id": sid, "from": chat, "to": None, "participant": None, "fromMe": True, "ack": ack,
                   "ackName": ACK_NAMES[ack], "_data": receipt}
    else:  # WEBJS: own message -> from = me, to = chat (whatsapp-web.js semantics)
        payload = {"id": sid, "from": BOT_ID, "to": chat, "fromMe": True, "ack": ack, "ackName": ACK_NAMES[ack]}
    return envelope("message.ack", payload, engine=engine, session=session, event_id=event_id,
                    timestamp_ms=ts_ms)


_STATUS_HISTORY = {"STARTING": ["STOPPED", "STARTING"], "SCAN_QR_CODE": ["STOPPED", "STARTING", "SCAN_QR_CODE"],
                   "WORKING": ["STOPPED", "STARTING", "WORKING"], "FAILED": ["STARTING", "WORKING", "FAILED"],
                   "STOPPED": ["STARTING", "WORKING", "STOPPED"],
                   "PASSKEY_REQUIRED": ["STOPPED", "STARTING", "PASSKEY_REQUIRED"],
                   "PASSKEY_CONFIRMATION_REQUIRED": ["STARTING", "PASSKEY_REQUIRED", "PASSKEY_CONFIRMATION_REQUIRED"]}


def session_status(engine: str = "WEBJS", status: str = "WORKING", *, session: str = SESSION,
                   data: Any = None, event_id: str | None = None,
                   timestamp_ms: int | None = None,
                   me: dict[str, Any] | EllipsisType | None = ...) -> dict[str, Any]:
    """``session.status`` with ``statuses`` = last 3 transitions (ms). ``me`` only once WORKING by default."""
    if status not in _STATUS_HISTORY:
        raise ValueError(f"unknown status {status!r}")
    ts_ms = _now_ms() if timestamp_ms is None else timestamp_ms
    history = _STATUS_HISTORY[status][-3:]
    statuses = [{"status": s, "timestamp": ts_ms - 1500 * (len(history) - 1 - i)} for i, s in enumerate(history)]
    payload = {"name": session, "status": status, "data": data, "statuses": statuses}
    if me is ...:
        me = default_me(engine) if status == "WORKING" else None
    return envelope("session.status", payload, engine=engine, session=session, event_id=event_id, me=me,
                    timestamp_ms=ts_ms)


def reaction(engine: str = "WEBJS", *, text: str = "👍", chat: str = CUSTOMER_PN, target_message_id: str | None = None,
             message_id: str | None = None, session: str = SESSION, event_id: str | None = None,
             timestamp_ms: int | None = None) -> dict[str, Any]:
    """``message.reaction`` by the customer on one of the bot's messages (``text: ""`` = reaction removed)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    ts_ms = _now_ms() if timestamp_ms is None else timestamp_ms
    ts = ts_ms // 1000 - 1
    target = serialize_message_id(True, chat, target_message_id or bare_message_id("web"))
    rid = serialize_message_id(False, chat, message_id or _default_bare_id(engine))
    body = {"text": text, "messageId": target}
    payload: dict[str, Any]
    if engine == "WEBJS":  # processMessageReaction: from/participant = senderId, to = id.remote
        payload = {"id": rid, "from": chat, "fromMe": False, "participant": chat, "to": chat, "timestamp": ts,
                   "reaction": body}
    elif engine == "NOWEB":  # to/participant undefined in DMs
        payload = {"id": rid, "timestamp": ts, "from": chat, "fromMe": False, "source": "app", "reaction": body}
    else:
        payload = {"id": rid, "timestamp": ts, "from": chat, "fromMe": False, "source": "app", "to": None,
                   "participant": None, "reaction": body}
    return envelope("message.reaction", payload, engine=engine, session=session, event_id=event_id,
                    timestamp_ms=ts_ms)


def lid_and_pn_pair(engine: str = "NOWEB", *, body: str = _DEFAULT_BODY,
                    bare_id: str | None = None, timestamp_ms: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same WhatsApp message delivered twice as ``message``: once from ``CUSTOMER_LID``, once from
    ``CUSTOMER_PN``; different envelope ids, same bare message id (#1309 NOWEB, #1627 GOWS)."""
    ts_ms = _now_ms() if timestamp_ms is None else timestamp_ms
    bare = bare_id or _default_bare_id(engine)
    ts = ts_ms // 1000 - 2
    by_lid = text_message(engine, body=body, sender=CUSTOMER_LID, message_id=bare, timestamp=ts,
                          timestamp_ms=ts_ms)
    by_pn = text_message(engine, body=body, sender=CUSTOMER_PN, message_id=bare, timestamp=ts,
                         timestamp_ms=ts_ms + 37)
    return by_lid, by_pn


# --------------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------------
def _js_numbers(value: Any) -> Any:
    """JSON.stringify prints 5.0 as ``5``; Python prints ``5.0``. Normalise integral floats."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _js_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_js_numbers(v) for v in value]
    return value


def dumps(envelope: dict[str, Any]) -> bytes:
    """The raw request body WAHA sends: compact ``JSON.stringify`` output, UTF-8, non-ASCII unescaped."""
    return json.dumps(_js_numbers(envelope), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign(body: bytes, key: str) -> str:
    """``X-Webhook-Hmac``: lower-case hex HMAC-SHA512 of the raw body (``X-Webhook-Hmac-Algorithm: sha512``)."""
    return hmac.new(key.encode("utf-8"), body, hashlib.sha512).hexdigest()
