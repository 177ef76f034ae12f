"""A customer's data on request (LGPD): what the store holds about one chat, and what is left after forgetting it.

Store.export_chat gathers a chat's rows from every table into a ChatExport (printed as JSON by
`--export-chat`); Store.forget_chat deletes them and returns a ForgetReport (`--forget-chat`). What forgetting
keeps: each finished message's key (session and WhatsApp's message id, no number, no text) and outcome, until
it expires with STATE_RETENTION_HOURS, so a redelivery of that message is still recognised and never answered
twice. Everything else about the chat goes: texts, replies, history, media, pauses, opt-out, marks, sent ids."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from whatsapp_webhook.events import bare_message_id

# What the kept message keys' rows say instead of the chat (the open-message queries never see them).
FORGOTTEN_CHAT = "forgotten"


@dataclass(frozen=True, kw_only=True)
class ChatExport:
    """Every row the store holds about one chat, as plain JSON-ready values."""

    chat_key: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # the inbox: each message, its reply and state
    history: list[dict[str, Any]] = field(default_factory=list)  # the turns the LLM sees
    chat_state: dict[str, Any] | None = None  # pauses, opt-out, rate-limit window
    marks: dict[str, str] = field(default_factory=dict)  # e.g. the last out-of-hours notice's period
    media: list[dict[str, Any]] = field(default_factory=list)  # kept voice notes and photos (size, not bytes)
    downloads: list[dict[str, Any]] = field(default_factory=list)  # files still to be fetched from WAHA (URL)
    sent: list[dict[str, Any]] = field(default_factory=list)  # the WhatsApp ids of our replies

    @property
    def empty(self) -> bool:
        return not (
            self.messages or self.history or self.chat_state or self.marks or self.media or self.downloads or self.sent
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=False)


@dataclass(frozen=True, kw_only=True)
class ForgetReport:
    """What forget_chat removed, table by table, and the message keys it kept (with nothing personal in them)."""

    deleted: dict[str, int]  # table -> rows deleted
    kept_keys: int  # finished messages whose key and outcome stay until they expire
    dropped_open: int  # messages still waiting for a reply, deleted (they will not be answered)

    def lines(self) -> list[str]:
        found = [f"deleted {count} row(s) from {table}" for table, count in self.deleted.items()]
        found.append(
            f"kept {self.kept_keys} answered message key(s) with their text, reply and number removed, until"
            " STATE_RETENTION_HOURS expires them (so a redelivery is not answered twice)"
        )
        if self.dropped_open:
            found.append(
                f"{self.dropped_open} message(s) still waiting for a reply were deleted and will not be answered"
            )
        return found


def scrubbed_message(message_json: str) -> str:
    """A stored IncomingMessage with everything that names the person or says what they wrote blanked out."""
    try:
        message = json.loads(message_json)
    except ValueError:
        return "{}"
    if not isinstance(message, dict):
        return "{}"
    message.update(
        chat_id=FORGOTTEN_CHAT,
        message_id=bare_message_id(str(message.get("message_id") or "")) or "",
        participant=None,
        text=None,
        reply_to_id=None,
        event_id=None,
    )
    return json.dumps(message, ensure_ascii=False)


def message_row(
    *,
    key: str,
    status: str,
    outcome: str | None,
    message_json: str,
    reply_text: str | None,
    sent_message_id: str | None,
    last_error: str | None,
    received_at: float,
    finished_at: float | None,
) -> dict[str, Any]:
    """One inbox row as the export shows it (the message's own fields, parsed)."""
    try:
        message = json.loads(message_json)
    except ValueError:
        message = None
    return {
        "key": key,
        "status": status,
        "outcome": outcome,
        "received_at": received_at,
        "finished_at": finished_at,
        "message": message,
        "reply_text": reply_text,
        "sent_message_id": sent_message_id,
        "last_error": last_error,
    }
