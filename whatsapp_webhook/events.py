"""WAHA webhook events: parse the envelope (WEBJS, NOWEB, GOWS), then decide what a reply bot answers and why not."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from whatsapp_webhook.health import CheckStatus

ANSWERED_EVENTS = ("message", "message.any")


# payload.id is "{fromMe}_{chatId}_{messageId}[_{participant}]"; the bare messageId is the
# same when one WhatsApp message arrives under its @lid and its phone-number chat id.
MESSAGE_ID_PATTERN = re.compile(r"^(?:true|false)_(?P<chat>[^_]+)_(?P<bare>[^_]+)(?:_.+)?$")


class BadRequestError(Exception):
    """The request cannot be processed as sent; answered with a 4xx JSON error."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, kw_only=True)
class WebhookEvent:
    """The WAHA envelope, with only the fields the server relies on typed."""

    event_id: str | None
    event: str
    session: str | None
    engine: str | None
    me_ids: frozenset[str]
    payload: Mapping[str, Any] | None
    timestamp_ms: float | None = None  # when WAHA created the event (signed with the body, unlike the header)


@dataclass(frozen=True, kw_only=True)
class IncomingMessage:
    """A customer message the bot should answer."""

    event_id: str | None
    event: str
    session: str
    engine: str | None
    chat_id: str
    message_id: str
    dedupe_key: str
    participant: str | None
    text: str | None
    timestamp: float | None
    mentions_bot: bool = False
    reply_to_id: str | None = None
    # payload.media as WAHA sent it (see media.py for what is downloaded, from where, and why not)
    has_media: bool = False
    media_url: str | None = None
    media_mimetype: str | None = None
    media_filename: str | None = None
    media_error: str | None = None

    @property
    def is_group(self) -> bool:
        return self.chat_id.endswith("@g.us")

    @property
    def chat_key(self) -> str:
        """Replies within one chat of one WAHA session go out one at a time, in order."""
        return f"{self.session}:{self.chat_id}"

    def to_json(self) -> str:
        # Every field is a plain value: a dict of them, not dataclasses.asdict's deep copy (4x the time,
        # once per delivery).
        return json.dumps({name: getattr(self, name) for name in _INCOMING_FIELDS}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> IncomingMessage:
        return cls(**json.loads(text))


_INCOMING_FIELDS = tuple(field.name for field in dataclasses.fields(IncomingMessage))


@dataclass(frozen=True, kw_only=True)
class OwnMessage:
    """Sent from this WhatsApp account: the bot's own echo, or a person answering from the phone or WhatsApp Web."""

    event_id: str | None
    session: str
    chat_id: str
    message_id: str
    text: str | None

    @property
    def chat_key(self) -> str:
        return f"{self.session}:{self.chat_id}"


class IgnoreReason(StrEnum):
    """The built-in reasons an event gets no reply: stable codes in the answer to WAHA, the log and /stats.

    A filter added to MESSAGE_FILTERS may use a code of its own (any string).
    """

    BROADCAST_LIST = "broadcast_list"
    CHANNEL = "channel"
    DUPLICATE = "duplicate"
    EVENT_NOT_HANDLED = "event_not_handled"
    FROM_ME = "from_me"
    GROUP_CHAT = "group_chat"
    GROUP_NOT_ADDRESSED = "group_not_addressed"
    INVALID_CHAT_ID = "invalid_chat_id"
    INVALID_MESSAGE_ID = "invalid_message_id"
    INVALID_SESSION = "invalid_session"
    NO_CHAT = "no_chat"
    NO_CONTENT = "no_content"
    NO_MESSAGE_ID = "no_message_id"
    NO_PAYLOAD = "no_payload"
    NO_SESSION = "no_session"
    OWN_NUMBER = "own_number"
    SESSION_STATUS = "session_status"
    STATUS_BROADCAST = "status_broadcast"
    STALE_EVENT = "stale_event"


@dataclass(frozen=True)
class Ignored:
    """Why an event gets no reply; `reason` is a stable code, `detail` is for humans."""

    reason: str  # an IgnoreReason, or a custom filter's own code
    detail: str


# WAHA's session states (waha.md §3); WORKING is the only one that can send.
SESSION_STATES = frozenset(
    {"STOPPED", "STARTING", "SCAN_QR_CODE", "PASSKEY_REQUIRED", "PASSKEY_CONFIRMATION_REQUIRED", "WORKING", "FAILED"}
)


SESSION_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# What a WhatsApp id looks like (5511...@c.us, ...@lid, ...@g.us, status@broadcast): no '/', '%',
# whitespace or control characters, so an id can never steer a URL built for WAHA. WAHA's spec gives no
# pattern; these are the characters its engines use.
CHAT_ID_PATTERN = re.compile(r"^[A-Za-z0-9@._:+-]{1,200}$")


def is_safe_id(value: str, pattern: re.Pattern[str]) -> bool:
    """A session name or chat id that is safe in a URL path: the right characters, and not '.' or '..'."""
    return bool(pattern.match(value)) and value.strip(".") != ""


@dataclass(frozen=True, kw_only=True)
class SessionStatus:
    """A `session.status` event: what /health says about that WAHA session until the next one."""

    event_id: str | None
    session: str
    state: str

    @property
    def check(self) -> tuple[CheckStatus, str]:
        if self.state == "WORKING":
            return CheckStatus.OK, f"WAHA session '{self.session}' is WORKING"
        if self.state in ("STOPPED", "FAILED"):
            return CheckStatus.FAILING, f"WAHA session '{self.session}' is {self.state}: nothing can be sent from it"
        hint = ": pair it by scanning the QR code in WAHA's dashboard" if self.state == "SCAN_QR_CODE" else ""
        return CheckStatus.DEGRADED, f"WAHA session '{self.session}' is {self.state}, not WORKING{hint}"


def parse_event(body: bytes) -> WebhookEvent:
    """Decode and type-check a WAHA webhook body; raise BadRequestError with a precise message."""
    if not body or not body.strip():
        raise BadRequestError("request body is empty; expected a WAHA webhook JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise BadRequestError("request body is nested too deeply") from None
    except ValueError:  # e.g. an integer longer than Python's 4300-digit limit
        raise BadRequestError("request body is not usable JSON: a number in it is too long") from None
    if not isinstance(document, dict):
        raise BadRequestError(f"request body must be a JSON object, got {_json_type(type(document))}")

    event = _field(document, "event", str, required=True)
    payload = _field(document, "payload", dict)
    me = _field(document, "me", dict) or {}
    me_ids = frozenset(v for v in (me.get("id"), me.get("lid")) if isinstance(v, str) and v)
    return WebhookEvent(
        event_id=_field(document, "id", str),
        event=event,
        session=_field(document, "session", str),
        engine=_field(document, "engine", str),
        me_ids=me_ids,
        payload=payload,
        timestamp_ms=_envelope_timestamp(document.get("timestamp")),
    )


def _envelope_timestamp(value: object) -> float | None:
    """The envelope's `timestamp` (ms) when it is a usable number; anything else is as good as absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _field(
    document: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False, where: str = ""
) -> Any:
    value = document.get(name)
    label = f"{where}{name}"
    if value is None:
        if required:
            raise BadRequestError(f"field '{label}' is required")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is a subclass of int: a JSON true must not pass as a number.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequestError(f"field '{label}' must be {_json_type(kinds[0])}, got {_json_type(type(value))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequestError(f"field '{label}' must be a finite number")
    if isinstance(value, str) and not _is_valid_unicode(value):
        raise BadRequestError(f"field '{label}' contains an invalid character (lone UTF-16 surrogate)")
    return value


def _is_valid_unicode(text: str) -> bool:
    """JSON escapes like \\ud800 decode to lone surrogates, which cannot be stored or sent on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _repair_text(text: str) -> str:
    """A message cut inside an emoji still deserves an answer: replace the broken half instead of refusing."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _json_type(kind: type) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(kind, kind.__name__)


@dataclass(frozen=True, kw_only=True)
class MessageFacts:
    """What a message filter looks at: the message's normalised fields."""

    me_ids: frozenset[str]  # the bot's own ids (me.id, me.lid)
    chat_id: str  # the chat a reply would go to (for our own messages: the chat they were sent in)
    from_me: bool
    source: str | None  # "api" for messages sent through WAHA's API, like the bot's replies
    participant: str | None  # the sender inside a group
    text: str  # the body or caption, stripped; "" when there is none
    has_other_content: bool  # media, a location or contacts
    reply_in_groups: bool


def ignore_api_sends(facts: MessageFacts) -> Ignored | None:
    return Ignored(IgnoreReason.FROM_ME, "message was sent through the WAHA API") if facts.source == "api" else None


def ignore_own_number(facts: MessageFacts) -> Ignored | None:
    sender_is_me = facts.chat_id in facts.me_ids or (
        facts.participant is not None and facts.participant in facts.me_ids
    )
    return (
        Ignored(IgnoreReason.OWN_NUMBER, "message comes from the bot's own number")
        if not facts.from_me and sender_is_me
        else None
    )


def ignore_status_broadcast(facts: MessageFacts) -> Ignored | None:
    return (
        Ignored(IgnoreReason.STATUS_BROADCAST, "status updates are not answered")
        if facts.chat_id == "status@broadcast"
        else None
    )


def ignore_broadcast_lists(facts: MessageFacts) -> Ignored | None:
    return (
        Ignored(IgnoreReason.BROADCAST_LIST, "broadcast lists are not answered")
        if facts.chat_id.endswith("@broadcast")
        else None
    )


def ignore_channels(facts: MessageFacts) -> Ignored | None:
    return (
        Ignored(IgnoreReason.CHANNEL, "channel posts are not answered")
        if facts.chat_id.endswith("@newsletter")
        else None
    )


def ignore_groups_unless_enabled(facts: MessageFacts) -> Ignored | None:
    if facts.chat_id.endswith("@g.us") and not facts.reply_in_groups:
        return Ignored(IgnoreReason.GROUP_CHAT, "group messages are not answered (REPLY_IN_GROUPS=false)")
    return None


def ignore_empty_messages(facts: MessageFacts) -> Ignored | None:
    if not facts.from_me and not facts.text and not facts.has_other_content:
        return Ignored(IgnoreReason.NO_CONTENT, "message has neither text nor media")
    return None


MessageFilter = Callable[[MessageFacts], Ignored | None]
# What a reply bot must not answer, checked in this order; the first filter that returns an Ignored
# decides (its reason is the stable code /stats counts). To add a rule, add one function here.
MESSAGE_FILTERS: list[MessageFilter] = [
    ignore_api_sends,
    ignore_own_number,
    ignore_status_broadcast,
    ignore_broadcast_lists,
    ignore_channels,
    ignore_groups_unless_enabled,
    ignore_empty_messages,
]


def classify_event(
    event: WebhookEvent, *, reply_in_groups: bool
) -> IncomingMessage | OwnMessage | SessionStatus | Ignored:
    """Decide whether a parsed event is a customer message to answer, one of our own, or neither (and why).

    Malformed fields raise BadRequestError (4xx); a well-formed event that cannot be answered (no chat,
    no message id, no session) is Ignored, because WAHA redelivers every non-2xx and redelivery cannot fix it.
    """
    if event.event == "session.status":
        return _session_status(event)
    if event.event not in ANSWERED_EVENTS:
        return Ignored(IgnoreReason.EVENT_NOT_HANDLED, f"event '{event.event}' is not a new message")
    payload = event.payload
    if payload is None:
        return Ignored(IgnoreReason.NO_PAYLOAD, f"a '{event.event}' event without a payload has nothing to answer")
    chat_id = _field(payload, "from", str, where="payload.")
    message_id = _field(payload, "id", str, where="payload.")
    if chat_id is None and message_id is not None:
        # WAHA's own status-broadcast example has no `from`; the id says which chat it is.
        match = MESSAGE_ID_PATTERN.match(message_id)
        chat_id = match.group("chat") if match else None
    if chat_id is None:
        return Ignored(
            IgnoreReason.NO_CHAT, "the message has neither payload.from nor a payload.id that names its chat"
        )
    if not event.session:
        return Ignored(IgnoreReason.NO_SESSION, "without a session there is no WAHA session to reply from")
    if not is_safe_id(event.session, SESSION_NAME_PATTERN):
        return Ignored(IgnoreReason.INVALID_SESSION, "the session name has characters WAHA session names never have")
    from_me = _field(payload, "fromMe", bool, where="payload.")
    source = _field(payload, "source", str, where="payload.")
    participant = _field(payload, "participant", str, where="payload.")
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        _field(payload, "body", str, where="payload.")  # raises the usual type error
    body = _repair_text(body) if body else body
    has_media = _field(payload, "hasMedia", bool, where="payload.")
    media = _field(payload, "media", dict, where="payload.")
    timestamp = _field(payload, "timestamp", (int, float), where="payload.")

    if from_me and message_id is not None:
        # The chat is the middle of '{fromMe}_{chat}_{id}': WEBJS reports our own messages *from* our id.
        match = MESSAGE_ID_PATTERN.match(message_id)
        chat_id = match.group("chat") if match else chat_id
    if not is_safe_id(chat_id, CHAT_ID_PATTERN):
        return Ignored(IgnoreReason.INVALID_CHAT_ID, "the chat id has characters WhatsApp ids never have")
    text = body.strip() if body else ""
    facts = MessageFacts(
        me_ids=event.me_ids,
        chat_id=chat_id,
        from_me=bool(from_me),
        source=source,
        participant=participant,
        text=text,
        has_other_content=bool(has_media or media or payload.get("location") or payload.get("vCards")),
        reply_in_groups=reply_in_groups,
    )
    for message_filter in MESSAGE_FILTERS:
        if (ignored := message_filter(facts)) is not None:
            return ignored
    if message_id is None:
        return Ignored(
            IgnoreReason.NO_MESSAGE_ID, "without payload.id the message cannot be told apart from its redeliveries"
        )
    if len(message_id) > MAX_MESSAGE_ID_CHARS or not message_id.isprintable():
        # It becomes the inbox's key: PostgreSQL refuses a NUL, and a key past ~2.7 KB does not fit its index.
        return Ignored(
            IgnoreReason.INVALID_MESSAGE_ID,
            f"payload.id is over {MAX_MESSAGE_ID_CHARS} characters or has characters WhatsApp ids never have",
        )
    if from_me:
        return OwnMessage(
            event_id=event.event_id,
            session=event.session,
            chat_id=chat_id,
            message_id=message_id,
            text=text or None,
        )

    match = MESSAGE_ID_PATTERN.match(message_id)
    bare_id = match.group("bare") if match else message_id
    media_fields = _media_fields(payload, has_media=bool(has_media), media=media)
    raw_reply_to = payload.get("replyTo")
    reply_to: Mapping[str, Any] = raw_reply_to if isinstance(raw_reply_to, dict) else {}
    reply_to_id = reply_to.get("id") if isinstance(reply_to.get("id"), str) else None
    return IncomingMessage(
        event_id=event.event_id,
        event=event.event,
        session=event.session,
        engine=event.engine,
        chat_id=chat_id,
        message_id=message_id,
        dedupe_key=f"{event.session}:{bare_id}",
        participant=participant,
        text=text or None,
        timestamp=_seconds(timestamp),
        mentions_bot=chat_id.endswith("@g.us") and _addresses_bot(text, payload, reply_to, event.me_ids),
        reply_to_id=reply_to_id,
        **media_fields,
    )


MAX_MEDIA_URL_CHARS = 4096
MAX_MESSAGE_ID_CHARS = 512  # WhatsApp's are under 150 (a group message's, with its participant)


def _media_fields(payload: Mapping[str, Any], *, has_media: bool, media: Mapping[str, Any] | None) -> dict[str, Any]:
    """payload.media as plain values: url, mimetype, filename, and why WAHA has no file (error, or none at all).

    WEBJS, NOWEB and GOWS all send {url, mimetype, filename[, error]}; `url` is null when WAHA did not
    download the file (WAHA_EVENTS_DOWNLOAD_MEDIA off, or a mimetype outside its list). Then the
    mimetype still comes from the engine's raw message (`_data`), so a video is told from a lost photo.
    """
    if not has_media and not media:
        return {}
    media = media or {}
    url = media.get("url") if isinstance(media.get("url"), str) else None
    if url is None and isinstance(payload.get("mediaUrl"), str):  # WEBJS's deprecated copy
        url = payload["mediaUrl"]
    mimetype = media.get("mimetype") if isinstance(media.get("mimetype"), str) else None
    filename = media.get("filename") if isinstance(media.get("filename"), str) else None
    error: str | None = None
    if media.get("error") not in (None, False, "", {}):
        error = "waha_error"
    elif url is None:
        error = "not_downloaded"
    elif len(url) > MAX_MEDIA_URL_CHARS or not _is_valid_unicode(url):
        url, error = None, "bad_url"
    return {
        "has_media": True,
        "media_url": url if error is None else None,
        "media_mimetype": _label(mimetype or _raw_mimetype(payload.get("_data"))),
        "media_filename": _label(filename),
        "media_error": error,
    }


def _label(text: str | None) -> str | None:
    """A file's mimetype or name as WAHA sent it, less what no store, log or URL can carry: control characters
    (NUL among them) and lone surrogates go, a line or paragraph separator becomes a space."""
    if not text:
        return None
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category not in ("Cc", "Cs"):
            kept.append(" " if category in ("Zl", "Zp") else char)
    return "".join(kept)[:200] or None


def _raw_mimetype(node: object, depth: int = 0) -> str | None:
    """The first `mimetype` in the engine's raw message (WEBJS _data.mimetype, NOWEB/GOWS *Message.mimetype)."""
    if depth > 6:
        return None
    if isinstance(node, dict):
        for key, value in node.items():
            if key.lower() == "mimetype" and isinstance(value, str):
                return value
        for value in node.values():
            if isinstance(value, dict) and (found := _raw_mimetype(value, depth + 1)):
                return found
    return None


def _session_status(event: WebhookEvent) -> SessionStatus | Ignored:
    payload = event.payload or {}
    state = _field(payload, "status", str, where="payload.")
    session = event.session or _field(payload, "name", str, where="payload.")
    if state not in SESSION_STATES or not session or not is_safe_id(session, SESSION_NAME_PATTERN):
        return Ignored(IgnoreReason.SESSION_STATUS, "session.status event without a known status and session name")
    return SessionStatus(event_id=event.event_id, session=session, state=state)


def _number_of(whatsapp_id: str) -> str:
    """'5511...@c.us', '5511...:12@s.whatsapp.net' and '1000...@lid' -> the digits before '@' or ':'."""
    return whatsapp_id.split("@")[0].split(":")[0]


def _addresses_bot(text: str, payload: Mapping[str, Any], reply_to: Mapping[str, Any], me_ids: frozenset[str]) -> bool:
    """In a group: the bot is @mentioned (in the text or in the engine's mention list) or its message is quoted."""
    numbers = {_number_of(i) for i in me_ids}
    if not numbers:
        return False  # WAHA sends 'me' only for a WORKING session; without it we cannot tell
    if any(f"@{number}" in text for number in numbers):
        return True
    quoted = reply_to.get("participant")
    if isinstance(quoted, str) and _number_of(quoted) in numbers:
        return True
    # WEBJS: _data.mentionedJidList; NOWEB/GOWS: contextInfo.mentionedJid / mentionedJID inside _data.
    pending: list[Any] = [payload.get("_data")]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("mentionedJidList", "mentionedJid", "mentionedJID") and isinstance(value, list):
                    mentioned = {
                        _number_of(v if isinstance(v, str) else str(v.get("_serialized", "")))
                        for v in value
                        if isinstance(v, (str, dict))
                    }
                    if mentioned & numbers:
                        return True
                elif isinstance(value, (dict, list)):
                    pending.append(value)
        elif isinstance(node, list):
            pending.extend(node)
    return False


def _seconds(timestamp: int | float | None) -> float | None:
    try:
        return float(timestamp) if timestamp is not None else None
    except OverflowError:
        raise BadRequestError("field 'payload.timestamp' is out of range") from None


def text_fingerprint(text: str | None) -> str | None:
    """Same words, same fingerprint: case and spacing do not make a loop or an echo look new."""
    if not text:
        return None
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()[:24]


def bare_message_id(message_id: str | None) -> str | None:
    if not message_id:
        return None
    match = MESSAGE_ID_PATTERN.match(message_id)
    return match.group("bare") if match else message_id
