"""WhatsApp AI reply server: WAHA webhook -> LLM (OpenRouter or any OpenAI-compatible API) -> WAHA sendText.

Production:  gunicorn -c gunicorn.conf.py whatsapp_webhook_server:app
Development: python whatsapp_webhook_server.py

The module reads in the order a message travels: settings, event parsing and
filters, signature check, store, LLM client, WAHA client, the reply pipeline,
the Flask app, the entry point.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import email.utils
import fcntl
import hashlib
import hmac
import json
import logging
import logging.handlers
import math
import os
import pathlib
import random
import re
import sqlite3
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import quote, urlparse

import httpx
import prometheus_client
from flask import Flask, Response, jsonify, request
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from werkzeug.exceptions import HTTPException

__version__ = "1.1.0"
# The names monitors written against the user's original document compare: /health and /stats
# say SERVICE_NAME, GET on the webhook says WEBHOOK_SERVICE_NAME.
SERVICE_NAME = "whatsapp_webhook_server"
WEBHOOK_SERVICE_NAME = "whatsapp_webhook"
WEBHOOK_PATH = "/api/v1/whatsapp/webhook"
EXTENSION_KEY = "whatsapp_webhook"
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

log = logging.getLogger("whatsapp_webhook")

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = (
    "You are the WhatsApp assistant of a business. Answer the customer's message "
    "helpfully, politely and briefly, in the same language the customer wrote in. "
    "Write plain text suitable for WhatsApp: short paragraphs, no Markdown tables or "
    "headings. If you do not know something about the business, say so honestly and "
    "offer to pass the question to a human."
)
DEFAULT_FALLBACK_MESSAGE = (
    "Desculpe, não consegui responder agora. Por favor, tente novamente em alguns minutos."
)
DEFAULT_NON_TEXT_REPLY = (
    "Por enquanto eu só entendo mensagens de texto. Pode me escrever sua pergunta?"
)
DEFAULT_RESET_REPLY = "Pronto! Comecei uma conversa nova. Como posso ajudar?"
DEFAULT_STOP_REPLY = ("Tudo bem, não vou mais responder automaticamente. "
                      "Se quiser voltar a falar com o assistente, envie VOLTAR.")
DEFAULT_START_REPLY = "Que bom ter você de volta! Como posso ajudar?"
DEFAULT_RATE_LIMIT_REPLY = ("Recebi muitas mensagens em pouco tempo. "
                            "Vou pausar as respostas por alguns instantes; tente de novo em breve.")
# Served on OpenRouter as of 2026-12 (../shared/reference/openrouter.md §9); `--check` verifies them
# against GET /models, because ids are retired every few months.
DEFAULT_MODEL = "google/gemini-3.1-flash-lite"
DEFAULT_FALLBACK_MODELS = ("google/gemini-3.5-flash",)
REASONING_EFFORTS = ("NONE", "MINIMAL", "LOW", "MEDIUM", "HIGH")
DEFAULT_STATE_DB = os.path.join(MODULE_DIR, "data", "whatsapp_webhook_state.db")
DEFAULT_ENV_FILE = ".env.webhook"
# Values copied from .env.webhook.example that still need a real value.
PLACEHOLDER_MARKERS = ("your-key-here", "your-waha-api-key", "change-me")


class SettingsError(ValueError):
    """One or more settings are missing or invalid; the message says which and how to fix them."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the server, loaded once from the environment and validated."""

    host: str = "0.0.0.0"
    port: int = 5002
    debug: bool = False
    openrouter_api_key: str = field(default="", repr=False)
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_model: str = DEFAULT_MODEL
    openrouter_fallback_models: tuple[str, ...] = DEFAULT_FALLBACK_MODELS
    llm_reasoning_effort: str = "minimal"
    ai_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    llm_max_tokens: int = 512
    llm_temperature: float = 0.7
    llm_attempt_timeout_seconds: float = 30.0
    llm_deadline_seconds: float = 45.0
    llm_max_attempts: int = 3
    waha_base_url: str = "http://localhost:3000"
    waha_api_key: str = field(default="", repr=False)
    waha_timeout_seconds: float = 15.0
    waha_send_attempts: int = 3
    webhook_secret_token: str | None = field(default=None, repr=False)
    webhook_hmac_key: str | None = field(default=None, repr=False)
    state_db: str = DEFAULT_STATE_DB
    log_file: str | None = "/tmp/whatsapp_webhook.log"
    log_level: str = "INFO"
    log_format: str = "text"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backup_count: int = 5
    reply_in_groups: bool = False
    fallback_message: str = DEFAULT_FALLBACK_MESSAGE
    non_text_reply: str = DEFAULT_NON_TEXT_REPLY
    typing_simulation: bool = True
    webhook_sync_wait_seconds: float = 20.0
    webhook_max_waiting: int = 16
    max_body_bytes: int = 1024 * 1024
    reply_max_attempts: int = 5
    reply_retry_seconds: float = 10.0
    lease_seconds: float = 30.0
    state_retention_hours: float = 72.0
    max_replies_in_flight: int = 256
    history_turns: int = 10
    history_ttl_minutes: float = 180.0
    history_max_chars: int = 8000
    reset_command: str = "/reset"
    reset_reply: str = DEFAULT_RESET_REPLY
    debounce_seconds: float = 3.0
    max_message_chars: int = 1500
    handoff_pause_minutes: float = 60.0
    bot_pause_command: str = "/bot off"
    bot_resume_command: str = "/bot on"
    stop_word: str = "PARAR"
    start_word: str = "VOLTAR"
    stop_reply: str = DEFAULT_STOP_REPLY
    start_reply: str = DEFAULT_START_REPLY
    rate_limit_per_minute: int = 10
    daily_message_limit: int = 200
    rate_limit_reply: str = DEFAULT_RATE_LIMIT_REPLY
    loop_repeats: int = 5
    loop_window_seconds: float = 120.0
    loop_pause_minutes: float = 60.0

    def command_of(self, text: str | None) -> str | None:
        """Which chat command a customer's whole message is, if any (case and spacing ignored)."""
        if not text:
            return None
        said = " ".join(text.lower().split())
        for name, word in (("reset", self.reset_command), ("stop", self.stop_word), ("start", self.start_word)):
            if said == " ".join(word.lower().split()):
                return name
        return None

    @property
    def llm_models(self) -> tuple[str, ...]:
        """The configured model, then its fallbacks, in the order they are tried."""
        return tuple(dict.fromkeys((self.openrouter_model, *self.openrouter_fallback_models)))

    @property
    def uses_openrouter(self) -> bool:
        return (urlparse(self.openrouter_base_url).hostname or "").endswith("openrouter.ai")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings; raise SettingsError listing every problem at once."""
        env = _EnvReader(os.environ if environ is None else environ)
        settings = cls(
            host=env.text("WEBHOOK_HOST", "0.0.0.0"),
            port=env.integer("WEBHOOK_PORT", 5002, minimum=1, maximum=65535),
            debug=env.boolean("DEBUG", False),
            openrouter_api_key=env.text("OPENROUTER_API_KEY", ""),
            openrouter_base_url=env.url("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1"),
            openrouter_model=env.text("OPENROUTER_MODEL", DEFAULT_MODEL),
            openrouter_fallback_models=env.id_list("OPENROUTER_FALLBACK_MODELS", DEFAULT_FALLBACK_MODELS),
            llm_reasoning_effort=env.choice("LLM_REASONING_EFFORT", "MINIMAL", REASONING_EFFORTS).lower(),
            ai_system_prompt=env.text("AI_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            llm_max_tokens=env.integer("LLM_MAX_TOKENS", 512, minimum=1, maximum=100_000),
            llm_temperature=env.number("LLM_TEMPERATURE", 0.7, minimum=0.0, maximum=2.0),
            llm_attempt_timeout_seconds=env.number("LLM_TIMEOUT_SECONDS", 30.0, minimum=0.1, maximum=600),
            llm_deadline_seconds=env.number("LLM_DEADLINE_SECONDS", 45.0, minimum=0.1, maximum=900),
            llm_max_attempts=env.integer("LLM_MAX_ATTEMPTS", 3, minimum=1, maximum=10),
            waha_base_url=env.url("WAHA_BASE_URL", "http://localhost:3000"),
            waha_api_key=env.text("WAHA_API_KEY", ""),
            waha_timeout_seconds=env.number("WAHA_TIMEOUT_SECONDS", 15.0, minimum=0.1, maximum=300),
            waha_send_attempts=env.integer("WAHA_SEND_ATTEMPTS", 3, minimum=1, maximum=10),
            webhook_secret_token=env.text("WEBHOOK_SECRET_TOKEN", "") or None,
            webhook_hmac_key=env.text("WEBHOOK_HMAC_KEY", "") or None,
            state_db=env.text("STATE_DB", DEFAULT_STATE_DB),
            log_file=env.text_allowing_empty("LOG_FILE", "/tmp/whatsapp_webhook.log") or None,
            log_level=env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=env.choice("LOG_FORMAT", "TEXT", ("TEXT", "JSON")).lower(),
            log_max_bytes=env.integer("LOG_MAX_BYTES", 10 * 1024 * 1024, minimum=0, maximum=2**40),
            log_backup_count=env.integer("LOG_BACKUP_COUNT", 5, minimum=1, maximum=1000),
            reply_in_groups=env.boolean("REPLY_IN_GROUPS", False),
            fallback_message=env.text("FALLBACK_MESSAGE", DEFAULT_FALLBACK_MESSAGE),
            non_text_reply=env.text("NON_TEXT_REPLY", DEFAULT_NON_TEXT_REPLY),
            typing_simulation=env.boolean("TYPING_SIMULATION", True),
            webhook_sync_wait_seconds=env.number("WEBHOOK_SYNC_WAIT_SECONDS", 20.0, minimum=0.0, maximum=600),
            webhook_max_waiting=env.integer("WEBHOOK_MAX_WAITING", 16, minimum=0, maximum=10_000),
            max_body_bytes=env.integer("MAX_BODY_BYTES", 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024),
            reply_max_attempts=env.integer("REPLY_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
            reply_retry_seconds=env.number("REPLY_RETRY_SECONDS", 10.0, minimum=0.0, maximum=3600),
            lease_seconds=env.number("LEASE_SECONDS", 30.0, minimum=1.0, maximum=3600),
            state_retention_hours=env.number("STATE_RETENTION_HOURS", 72.0, minimum=0.01, maximum=24 * 365),
            max_replies_in_flight=env.integer("MAX_REPLIES_IN_FLIGHT", 256, minimum=1, maximum=10_000),
            history_turns=env.integer("HISTORY_TURNS", 10, minimum=0, maximum=200),
            history_ttl_minutes=env.number("HISTORY_TTL_MINUTES", 180.0, minimum=0.0, maximum=525_600),
            history_max_chars=env.integer("HISTORY_MAX_CHARS", 8000, minimum=0, maximum=1_000_000),
            reset_command=env.text("RESET_COMMAND", "/reset"),
            reset_reply=env.text("RESET_REPLY", DEFAULT_RESET_REPLY),
            debounce_seconds=env.number("DEBOUNCE_SECONDS", 3.0, minimum=0.0, maximum=120),
            max_message_chars=env.integer("MAX_MESSAGE_CHARS", 1500, minimum=100, maximum=65_536),
            handoff_pause_minutes=env.number("HANDOFF_PAUSE_MINUTES", 60.0, minimum=0.0, maximum=525_600),
            bot_pause_command=env.text("BOT_PAUSE_COMMAND", "/bot off"),
            bot_resume_command=env.text("BOT_RESUME_COMMAND", "/bot on"),
            stop_word=env.text("STOP_WORD", "PARAR"),
            start_word=env.text("START_WORD", "VOLTAR"),
            stop_reply=env.text("STOP_REPLY", DEFAULT_STOP_REPLY),
            start_reply=env.text("START_REPLY", DEFAULT_START_REPLY),
            rate_limit_per_minute=env.integer("RATE_LIMIT_PER_MINUTE", 10, minimum=1, maximum=100_000),
            daily_message_limit=env.integer("DAILY_MESSAGE_LIMIT", 200, minimum=1, maximum=1_000_000),
            rate_limit_reply=env.text("RATE_LIMIT_REPLY", DEFAULT_RATE_LIMIT_REPLY),
            loop_repeats=env.integer("LOOP_REPEATS", 5, minimum=2, maximum=1000),
            loop_window_seconds=env.number("LOOP_WINDOW_SECONDS", 120.0, minimum=1.0, maximum=86_400),
            loop_pause_minutes=env.number("LOOP_PAUSE_MINUTES", 60.0, minimum=0.0, maximum=525_600),
        )
        env.require_real("WAHA_API_KEY", settings.waha_api_key, "the X-Api-Key your WAHA server expects (WAHA_API_KEY in WAHA's own config)")
        if settings.uses_openrouter:
            env.require_real("OPENROUTER_API_KEY", settings.openrouter_api_key, "your key from https://openrouter.ai/keys")
        if not settings.fallback_message.strip():
            env.problems.append("FALLBACK_MESSAGE must not be empty: it is sent when the LLM cannot answer")
        if not settings.non_text_reply.strip():
            env.problems.append("NON_TEXT_REPLY must not be empty: it is sent for media without a caption")
        if env.problems:
            raise SettingsError(
                "Invalid configuration:\n  - " + "\n  - ".join(env.problems)
                + "\nSet these as environment variables or in .env.webhook (see .env.webhook.example)."
            )
        return settings


class _EnvReader:
    """Typed access to environment variables that collects problems instead of failing on the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def text_allowing_empty(self, name: str, default: str) -> str:
        """Like text(), but a variable that is set and empty means "none" rather than "default"."""
        return default if name not in self.environ else self.environ[name].strip()

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        return self._bounded(name, default, int, minimum, maximum, "a whole number")

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        return self._bounded(name, default, float, minimum, maximum, "a number")

    def _bounded(self, name: str, default: T, parse: Callable[[str], T], minimum: Any, maximum: Any, kind: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value: Any = parse(raw)
        except ValueError:
            value = None
        # NaN fails every comparison, so "nan" is refused here too.
        if value is None or not minimum <= value <= maximum:
            self.problems.append(f"{name} must be {kind} from {_plain(minimum)} to {_plain(maximum)}, got {raw!r}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = (self._raw(name) or default).upper()
        if raw not in choices:
            self.problems.append(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
            return default
        return raw

    def url(self, name: str, default: str) -> str:
        raw = self.text(name, default).rstrip("/")
        parsed = urlparse(raw)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.problems.append(f"{name} must be an http:// or https:// URL, got {raw!r}")
            return default
        return raw

    def id_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Comma-separated ids; set and empty means none. Spaces around commas are ignored, repeats dropped."""
        if name not in self.environ:
            return default
        ids = [part.strip() for part in self.environ[name].split(",")]
        if any(" " in i for i in ids):
            self.problems.append(f"{name} must be model ids separated by commas, got {self.environ[name]!r}")
            return default
        return tuple(dict.fromkeys(i for i in ids if i))

    def require_real(self, name: str, value: str, what: str) -> None:
        if not value:
            self.problems.append(f"{name} is not set: put {what} there")
        elif any(marker in value for marker in PLACEHOLDER_MARKERS):
            self.problems.append(f"{name} still holds the placeholder from .env.webhook.example: put {what} there")


def _plain(number: float) -> str:
    """65535, 1000000 and 0.5 as people write them (not 1e+06 or 0.0)."""
    return format(number, "f").rstrip("0").rstrip(".") if isinstance(number, float) else str(number)


def load_settings(env_file: str | None = None) -> Settings:
    """Load `.env.webhook` (never overriding real environment variables), then read settings."""
    from dotenv import load_dotenv

    path = env_file or os.environ.get("WEBHOOK_ENV_FILE") or _find_env_file()
    if path and os.path.isfile(path):
        load_dotenv(path, override=False)
    return Settings.from_env()


def _find_env_file() -> str | None:
    for folder in (os.getcwd(), MODULE_DIR):
        candidate = os.path.join(folder, DEFAULT_ENV_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------
# Event parsing and filters
# ---------------------------------------------------------------------------

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

    @property
    def is_group(self) -> bool:
        return self.chat_id.endswith("@g.us")

    @property
    def chat_key(self) -> str:
        """Replies within one chat of one WAHA session go out one at a time, in order."""
        return f"{self.session}:{self.chat_id}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> IncomingMessage:
        return cls(**json.loads(text))


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


@dataclass(frozen=True)
class Ignored:
    """Why an event gets no reply; `reason` is a stable code, `detail` is for humans."""

    reason: str
    detail: str


# WAHA's session states (waha.md §3); WORKING is the only one that can send.
SESSION_STATES = frozenset({"STOPPED", "STARTING", "SCAN_QR_CODE", "PASSKEY_REQUIRED",
                            "PASSKEY_CONFIRMATION_REQUIRED", "WORKING", "FAILED"})
SESSION_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
        raise BadRequestError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
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
    )


def _field(document: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False,
           where: str = "") -> Any:
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
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(kind, kind.__name__)


def classify_event(event: WebhookEvent, *,
                   reply_in_groups: bool) -> IncomingMessage | OwnMessage | SessionStatus | Ignored:
    """Decide whether a parsed event is a customer message to answer, one of our own, or neither (and why).

    Malformed fields raise BadRequestError (4xx); a well-formed event that cannot be answered (no chat,
    no message id, no session) is Ignored, because WAHA redelivers every non-2xx and redelivery cannot fix it.
    """
    if event.event == "session.status":
        return _session_status(event)
    if event.event not in ANSWERED_EVENTS:
        return Ignored("event_not_handled", f"event '{event.event}' is not a new message")
    payload = event.payload
    if payload is None:
        return Ignored("no_payload", f"a '{event.event}' event without a payload has nothing to answer")
    chat_id = _field(payload, "from", str, where="payload.")
    message_id = _field(payload, "id", str, where="payload.")
    if chat_id is None and message_id is not None:
        # WAHA's own status-broadcast example has no `from`; the id says which chat it is.
        match = MESSAGE_ID_PATTERN.match(message_id)
        chat_id = match.group("chat") if match else None
    if chat_id is None:
        return Ignored("no_chat", "the message has neither payload.from nor a payload.id that names its chat")
    if not event.session:
        return Ignored("no_session", "without a session there is no WAHA session to reply from")
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

    if source == "api":
        return Ignored("from_me", "message was sent through the WAHA API")
    if from_me and message_id is not None:
        # The chat is the middle of '{fromMe}_{chat}_{id}': WEBJS reports our own messages *from* our id.
        match = MESSAGE_ID_PATTERN.match(message_id)
        chat_id = match.group("chat") if match else chat_id
    if not from_me and (chat_id in event.me_ids or (participant is not None and participant in event.me_ids)):
        return Ignored("own_number", "message comes from the bot's own number")
    if chat_id == "status@broadcast":
        return Ignored("status_broadcast", "status updates are not answered")
    if chat_id.endswith("@broadcast"):
        return Ignored("broadcast_list", "broadcast lists are not answered")
    if chat_id.endswith("@newsletter"):
        return Ignored("channel", "channel posts are not answered")
    if chat_id.endswith("@g.us") and not reply_in_groups:
        return Ignored("group_chat", "group messages are not answered (REPLY_IN_GROUPS=false)")
    if message_id is None:
        return Ignored("no_message_id", "without payload.id the message cannot be told apart from its redeliveries")
    if from_me:
        return OwnMessage(event_id=event.event_id, session=event.session, chat_id=chat_id, message_id=message_id,
                          text=body.strip() if body else None)

    text = body.strip() if body else ""
    has_other_content = bool(has_media or media or payload.get("location") or payload.get("vCards"))
    if not text and not has_other_content:
        return Ignored("no_content", "message has neither text nor media")

    match = MESSAGE_ID_PATTERN.match(message_id)
    bare_id = match.group("bare") if match else message_id
    reply_to = payload.get("replyTo") if isinstance(payload.get("replyTo"), dict) else {}
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
    )


def _session_status(event: WebhookEvent) -> SessionStatus | Ignored:
    payload = event.payload or {}
    state = _field(payload, "status", str, where="payload.")
    session = event.session or _field(payload, "name", str, where="payload.")
    if state not in SESSION_STATES or not session or not SESSION_NAME_PATTERN.match(session):
        return Ignored("session_status", "session.status event without a known status and session name")
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
                    mentioned = {_number_of(v if isinstance(v, str) else str(v.get("_serialized", "")))
                                 for v in value if isinstance(v, (str, dict))}
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


# ---------------------------------------------------------------------------
# Signature check
# ---------------------------------------------------------------------------

def compute_waha_hmac(body: bytes, key: str) -> str:
    """WAHA's X-Webhook-Hmac: lowercase hex HMAC-SHA512 of the raw body."""
    return hmac.new(key.encode("utf-8"), body, hashlib.sha512).hexdigest()


def verify_waha_hmac(body: bytes, signature: str | None, key: str, *, algorithm: str | None = None) -> bool:
    """True when `signature` is WAHA's HMAC of exactly these bytes (compared in constant time)."""
    if not signature or (algorithm is not None and algorithm.lower() != "sha512"):
        return False
    try:
        provided = signature.strip().lower().encode("ascii")
    except UnicodeEncodeError:  # compare_digest refuses non-ASCII str; such a header is simply wrong
        return False
    return hmac.compare_digest(compute_waha_hmac(body, key).encode("ascii"), provided)


def verify_token(provided: str | None, expected: str) -> bool:
    """Constant-time comparison of the shared X-Webhook-Token."""
    return provided is not None and hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))


# ---------------------------------------------------------------------------
# Health: what /health reports, one document shared by every worker
# ---------------------------------------------------------------------------

class CheckStatus(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # replies still go out, but not as configured (a fallback model, a session not WORKING)
    FAILING = "failing"  # this part does not work at all


class ServerHealth(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # HTTP 200: messages are recorded and answered, something needs a look
    UNHEALTHY = "unhealthy"  # HTTP 503: a new message cannot be recorded


CHECK_SEVERITY = {CheckStatus.OK: 0, CheckStatus.DEGRADED: 1, CheckStatus.FAILING: 2}
# The parts /health always reports. Reports are stored under a part's name, or "part:detail"
# ("waha:default", one per WAHA session); the part shows the worst of them.
HEALTH_CHECKS = ("store", "llm", "waha")


@dataclass(frozen=True, kw_only=True)
class HealthCheck:
    status: CheckStatus
    reason: str
    since: float  # when this status began (unix seconds)

    def to_json(self) -> dict[str, Any]:
        return {"status": str(self.status), "reason": self.reason,
                "since": datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")}


def combine_checks(reports: Iterable[HealthCheck]) -> HealthCheck | None:
    """One part's status from its reports (several WAHA sessions): the worst, with the reasons for it."""
    reports = list(reports)
    if not reports:
        return None
    worst = max(CHECK_SEVERITY[r.status] for r in reports)
    chosen = [r for r in reports if CHECK_SEVERITY[r.status] == worst]
    return HealthCheck(status=chosen[0].status, reason="; ".join(dict.fromkeys(r.reason for r in chosen)),
                       since=min(r.since for r in chosen))


def overall_health(checks: Mapping[str, HealthCheck]) -> ServerHealth:
    """Unhealthy only when a message cannot be recorded; degraded when anything else is not ok."""
    store = checks.get("store")
    if store is not None and store.status is CheckStatus.FAILING:
        return ServerHealth.UNHEALTHY
    if any(check.status is not CheckStatus.OK for check in checks.values()):
        return ServerHealth.DEGRADED
    return ServerHealth.HEALTHY


class HealthReporter:
    """Writes what a worker learns (a fallback model answered, WAHA said 422) into the shared store.

    Only changes are written, and an unchanged report again after REFRESH_SECONDS (another worker
    may have written something else meanwhile), so steady traffic costs no writes.
    """

    REFRESH_SECONDS = 10.0
    MAX_PARTS = 200  # bounds the rows one part ("waha:<session>") can create

    def __init__(self, *, store: StateStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._written: dict[str, tuple[CheckStatus, str, float]] = {}

    def needs_write(self, name: str, status: CheckStatus, reason: str) -> bool:
        with self._lock:
            written = self._written.get(name)
        return written is None or written[:2] != (status, reason) or self.clock() - written[2] >= self.REFRESH_SECONDS

    def report(self, name: str, status: CheckStatus, reason: str) -> None:
        """Record a part's state (blocking: call from a thread). A store failure only costs the report."""
        if not self.needs_write(name, status, reason):
            return
        try:
            self.store.set_health(name, status, reason, max_parts=self.MAX_PARTS)
        except StoreUnavailable as exc:
            log.warning("could not record health %s=%s: %s", name, status, exc)
            return
        with self._lock:
            self._written[name] = (status, reason, self.clock())

    def last_known(self) -> dict[str, HealthCheck]:
        """What this worker last wrote, for when the shared store cannot be read."""
        with self._lock:
            written = dict(self._written)
        now = time.time()
        return {name: HealthCheck(status=status, reason=reason, since=now)
                for name, (status, reason, _) in written.items()}


# ---------------------------------------------------------------------------
# Store: the durable inbox and counters shared by every gunicorn worker (SQLite)
# ---------------------------------------------------------------------------

class StoreUnavailable(Exception):
    """The state store could not be read or written."""


OPEN_STATUSES_SQL = "('queued', 'processing', 'sending', 'merged')"


@dataclass(frozen=True)
class Acceptance:
    """What the inbox did with a delivery: stored it, woke a failed one up for retry, or saw a duplicate."""

    stored: bool
    status: str
    attempts: int


@dataclass(frozen=True)
class ClaimedMessage:
    """A message this worker now owns until `lease_owner`'s lease runs out, with the burst merged into it."""

    message: IncomingMessage
    lease_owner: str
    previous_status: str  # 'sending' means an earlier attempt may already have sent (part of) the reply
    attempts: int
    reply_text: str | None
    outcome: str | None
    send_started_at: float | None
    received_at: float
    parts_sent: int = 0
    merged: tuple[IncomingMessage, ...] = ()

    @property
    def texts(self) -> list[str]:
        """What the customer wrote, in order: this message and the ones typed right after it."""
        return [m.text for m in (self.message, *self.merged) if m.text]


@dataclass(frozen=True)
class InboxEntry:
    status: str
    attempts: int
    outcome: str | None
    sent_message_id: str | None
    last_error: str | None
    merged_into: str | None


@dataclass(frozen=True)
class Admission:
    """Whether a chat may get a reply now; `notice` says the customer should be told once why not."""

    verdict: str  # ok | paused | opted_out | rate_limited | daily_cap | loop
    notice: bool = False


STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    key TEXT PRIMARY KEY,
    chat_key TEXT NOT NULL,
    sort_ts REAL NOT NULL,
    message TEXT NOT NULL,
    text_hash TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL NOT NULL DEFAULT 0,
    merged_into TEXT,
    merged TEXT,
    outcome TEXT,
    reply_text TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    sent_message_id TEXT,
    last_error TEXT,
    send_started_at REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS inbox_by_status ON inbox (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS inbox_by_chat ON inbox (chat_key, sort_ts);
CREATE INDEX IF NOT EXISTS inbox_open_by_chat ON inbox (chat_key, status, received_at);
CREATE INDEX IF NOT EXISTS inbox_by_finish ON inbox (finished_at);
CREATE INDEX IF NOT EXISTS inbox_by_merge ON inbox (merged_into);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_key TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_chat ON history (chat_key, id);
CREATE INDEX IF NOT EXISTS history_by_age ON history (created_at);
CREATE TABLE IF NOT EXISTS chat_state (
    chat_key TEXT PRIMARY KEY,
    paused_until REAL NOT NULL DEFAULT 0,
    pause_reason TEXT,
    opted_out INTEGER NOT NULL DEFAULT 0,
    minute_start REAL NOT NULL DEFAULT 0,
    minute_count INTEGER NOT NULL DEFAULT 0,
    day TEXT NOT NULL DEFAULT '',
    day_count INTEGER NOT NULL DEFAULT 0,
    notice_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sent (
    chat_key TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    bare_id TEXT,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_by_chat ON sent (chat_key, text_hash);
CREATE INDEX IF NOT EXISTS sent_by_id ON sent (bare_id);
CREATE INDEX IF NOT EXISTS sent_by_age ON sent (sent_at);
CREATE TABLE IF NOT EXISTS health (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""
IGNORED_COUNTER_PREFIX = "ignored."
LLM_COST_COUNTER = "llm_cost_nanousd"  # counters are integers: cost in billionths of a dollar
PAUSED_FOREVER = 1e12  # an operator's "/bot off" lasts until "/bot on"
ECHO_MIN_CHARS = 40

# The earliest message of its chat that is due, whose chat has no other reply in progress
# and whose burst is over (no message in the last DEBOUNCE_SECONDS, or the burst is old enough).
# Order within a chat is the customer's send time, then arrival (rowid); a reply that already
# reached the customer in part is finished before anything else in its chat.
NEXT_DUE_SQL = """
SELECT m.key FROM inbox m
WHERE m.status IN ('queued', 'processing', 'sending')
  AND ((m.status = 'queued' AND m.next_attempt_at <= :now
        AND (m.received_at <= :burst_limit OR NOT EXISTS (
            SELECT 1 FROM inbox q WHERE q.chat_key = m.chat_key AND q.status = 'queued'
              AND q.received_at > :quiet_since)))
       OR (m.status != 'queued' AND m.lease_expires_at < :now))
  AND NOT EXISTS (
      SELECT 1 FROM inbox o
      WHERE o.chat_key = m.chat_key AND o.key != m.key AND o.status IN ('queued', 'processing', 'sending')
        AND ((o.status != 'queued' AND o.lease_expires_at >= :now)
             OR (m.status != 'sending' AND m.parts_sent = 0
                 AND (o.status = 'sending' OR o.parts_sent > 0
                      OR o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.rowid < m.rowid)))))
ORDER BY m.sort_ts, m.rowid
LIMIT :limit
"""
EARLIER_OPEN_SQL = """
SELECT 1 FROM inbox o, inbox m
WHERE m.key = :key AND o.chat_key = m.chat_key AND o.key != m.key AND o.status IN ('queued', 'processing', 'sending')
  AND (o.sort_ts < m.sort_ts OR (o.sort_ts = m.sort_ts AND o.rowid < m.rowid))
LIMIT 1
"""


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


@dataclass(eq=False)
class QueuedWrite:
    """One write transaction's work, waiting at the WriterGate for a turn; filled in when committed."""

    work: Callable[[sqlite3.Connection], Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class WriterGate:
    """One writer at a time across threads (a lock) and gunicorn workers (flock on a side file),
    committing together the writes that queued up meanwhile (group commit).

    SQLite serialises writers too, but a blocked writer polls with sleeps of 1 to 100 ms; under
    load that idles the CPU while requests queue. Waiting here wakes the moment the writer is done.
    This lock is the one thing every worker shares, and under load dozens of writes wait for it,
    so whoever holds it commits all of them in one transaction: one BEGIN/COMMIT and one hand-off
    between processes instead of one each (bench/README.md, "Where the time went").
    """

    MAX_BATCH = 64  # bounds how long one turn holds the lock

    def __init__(self, path: str) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._pid: int | None = None
        self._turns = threading.Condition()  # guards the queue and whether a thread is writing
        self._queue: list[QueuedWrite] = []
        self._writing = False
        self._fd = -1

    def _for_this_process(self) -> None:
        if self._pid != os.getpid():
            with self._guard:  # first use in this process (never share a lock, queue or fd across fork)
                if self._pid != os.getpid():
                    self._turns = threading.Condition()
                    self._queue = []
                    self._writing = False
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    self._pid = os.getpid()

    def write(self, work: Callable[[sqlite3.Connection], T],
              commit: Callable[[list[QueuedWrite]], None]) -> T:
        """Queue `work` and wait until a writing thread (this one, if none is) has committed it.

        Returns what `work` returned, or raises what it raised (StoreUnavailable for the store itself).
        """
        self._for_this_process()
        queued = QueuedWrite(work)
        try:
            with self._turns:
                self._queue.append(queued)
                while self._writing and not queued.done:
                    self._turns.wait()
                leading = not queued.done
                self._writing = self._writing or leading
            if leading:
                try:
                    while not queued.done:
                        self._commit_next_batch(commit)
                finally:
                    with self._turns:
                        self._writing = False
                        self._turns.notify_all()  # the next waiting write leads
        except BaseException:
            with self._turns:  # the caller is gone (interrupted): a write nobody waits for must not happen later
                if queued in self._queue:
                    self._queue.remove(queued)
            raise
        if queued.error is not None:
            raise queued.error
        return queued.result

    def _commit_next_batch(self, commit: Callable[[list[QueuedWrite]], None]) -> None:
        batch: list[QueuedWrite] = []
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                # Taken only now: the writes that queued while the other workers held the lock go too.
                batch = self._take_batch()
                commit(batch)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            batch = batch or self._take_batch()
            for item in batch:
                if not item.done:
                    item.error = StoreUnavailable(f"state store lock error: {exc}")
        finally:
            with self._turns:
                for item in batch:  # nobody waits forever, whatever happened to this turn
                    if not item.done:
                        item.done = True
                        item.error = item.error or StoreUnavailable("state store write abandoned")
                self._turns.notify_all()  # their threads return now, not after the next turn

    def _take_batch(self) -> list[QueuedWrite]:
        with self._turns:
            batch = self._queue[:self.MAX_BATCH]
            del self._queue[:self.MAX_BATCH]
        return batch


class StateStore:
    """The durable inbox plus counters in one SQLite file, safe across threads and processes.

    A message is written here before the webhook answers 2xx, so it survives any crash.
    Workers then take due messages under a renewable lease; a lease that runs out
    (killed worker) lets any other worker finish the message. Every state change is one
    atomic step of a short write transaction (writes waiting together share one), so it is
    atomic across workers. Connections are per thread and per process: a connection must never cross a fork.
    """

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self._local = threading.local()
        self._writers = WriterGate(path + ".lock")

    def initialize(self) -> None:
        """Create the file and schema; fail early with a clear message if that is impossible."""
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            connection = self._open()
            try:
                connection.executescript(STORE_SCHEMA)
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(f"STATE_DB {self.path!r} cannot be used ({exc}); point STATE_DB at a writable file") from None

    def _open(self) -> sqlite3.Connection:
        # mode=rwc: fail when the file is not writable instead of quietly opening it read-only.
        uri = pathlib.Path(self.path).absolute().as_uri() + "?mode=rwc"
        connection = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                     check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection = self._open()
            local.pid = os.getpid()
        return local.connection

    def _transaction(self, work: Callable[[sqlite3.Connection], T], *, begin: str = "BEGIN IMMEDIATE") -> T:
        """Run `work` in a transaction of its own (reads) or as one atomic step of a group commit (writes).

        Reads ("BEGIN") run beside writers, as WAL allows; writes queue at the WriterGate.
        """
        if begin != "BEGIN":
            return self._writers.write(work, self._commit)
        connection: sqlite3.Connection | None = None
        try:
            connection = self._connection()
            connection.execute(begin)
            result = work(connection)
            connection.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            self._abandon(connection)
            raise StoreUnavailable(f"state store error: {exc}") from exc
        except BaseException:
            self._abandon(connection)
            raise

    def _commit(self, batch: list[QueuedWrite]) -> None:
        """The writes in one IMMEDIATE transaction, in queue order, each in a savepoint.

        A write that fails on its own (a bug, or SQLite refusing that statement: a constraint, a bad
        parameter) is undone alone and its caller gets the error; the others commit. A failure of
        the database itself (I/O, full disk, corruption) fails the whole batch: StoreUnavailable.
        """
        connection: sqlite3.Connection | None = None
        try:
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            for item in batch:
                connection.execute("SAVEPOINT one_write")
                try:
                    item.result = item.work(connection)
                except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError,
                        sqlite3.DataError) as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = StoreUnavailable(f"state store error: {exc}")
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    connection.execute("ROLLBACK TO one_write")
                    item.error = exc
                connection.execute("RELEASE one_write")
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon(connection)
            for item in batch:
                item.result, item.error = None, StoreUnavailable(f"state store error: {exc}")
        except BaseException:
            self._abandon(connection)
            raise
        for item in batch:
            item.done = True

    def _abandon(self, connection: sqlite3.Connection | None) -> None:
        """Roll back and drop the connection: after an I/O error SQLite may refuse to work on it again."""
        if connection is None:
            return
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            connection.close()
        except sqlite3.Error:
            pass
        self._local.pid = None  # the next call on this thread opens a fresh connection

    @staticmethod
    def _bump(connection: sqlite3.Connection, name: str, amount: int = 1) -> None:
        connection.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def count(self, name: str, amount: int = 1) -> None:
        self._transaction(lambda c: self._bump(c, name, amount))

    # --- the webhook side ------------------------------------------------------------------------

    def accept(self, message: IncomingMessage) -> Acceptance:
        """Record a delivery durably, once per message; a redelivery after a failed send makes it due now."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> Acceptance:
            inserted = c.execute(
                "INSERT INTO inbox (key, chat_key, sort_ts, message, text_hash, status, next_attempt_at, received_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (message.dedupe_key, message.chat_key, message.timestamp or now, message.to_json(),
                 text_fingerprint(message.text), now, now, now),
            ).rowcount
            if inserted:
                self._bump(c, "messages_received")
                return Acceptance(stored=True, status="queued", attempts=0)
            status, attempts, last_error = c.execute(
                "SELECT status, attempts, last_error FROM inbox WHERE key = ?", (message.dedupe_key,)).fetchone()
            if status == "queued" and last_error is not None:
                # WAHA redelivers what we answered with 5xx: try again now rather than at the backoff.
                # That attempt is WAHA's (bounded by its own retry policy), so it does not use up ours.
                c.execute("UPDATE inbox SET next_attempt_at = ?, attempts = attempts - 1, updated_at = ?"
                          " WHERE key = ?", (now, now, message.dedupe_key))
                return Acceptance(stored=True, status=status, attempts=attempts - 1)
            return Acceptance(stored=False, status=status, attempts=attempts)

        return self._transaction(work)

    def entry(self, key: str) -> InboxEntry | None:
        """A message's state; a message merged into another reports that one's sent id and error."""
        try:
            row = self._connection().execute(
                "SELECT m.status, m.attempts, m.outcome, COALESCE(m.sent_message_id, lead.sent_message_id),"
                " COALESCE(m.last_error, lead.last_error), m.merged_into"
                " FROM inbox m LEFT JOIN inbox lead ON lead.key = m.merged_into WHERE m.key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store error: {exc}") from exc
        return InboxEntry(*row) if row else None

    # --- the worker side -------------------------------------------------------------------------

    def claim_due(self, owner: str, *, limit: int, lease_seconds: float, debounce_seconds: float = 0.0,
                  mergeable: Callable[[IncomingMessage], bool] = lambda message: False) -> list[ClaimedMessage]:
        """Take up to `limit` due messages, at most one per chat (the earliest), in one transaction.

        Claiming in batches keeps the write lock short per message when hundreds are waiting.
        """
        now = self.clock()
        params = {"now": now, "quiet_since": now - debounce_seconds, "burst_limit": now - 4 * debounce_seconds,
                  "limit": limit}

        def work(c: sqlite3.Connection) -> list[ClaimedMessage]:
            return [self._claim_one(c, key, owner, now=now, lease_seconds=lease_seconds,
                                    debounce_seconds=debounce_seconds, mergeable=mergeable)
                    for (key,) in c.execute(NEXT_DUE_SQL, params).fetchall()]

        return self._transaction(work)

    def _claim_one(self, c: sqlite3.Connection, key: str, owner: str, *, now: float, lease_seconds: float,
                   debounce_seconds: float, mergeable: Callable[[IncomingMessage], bool]) -> ClaimedMessage:
        (message, status, attempts, reply_text, outcome, send_started_at, received_at, parts_sent,
         merged) = c.execute(
            "UPDATE inbox SET status = CASE status WHEN 'sending' THEN 'sending' ELSE 'processing' END,"
            " attempts = attempts + 1, lease_owner = ?, lease_expires_at = ?, updated_at = ? WHERE key = ?"
            " RETURNING message, status, attempts, reply_text, outcome, send_started_at, received_at,"
            " parts_sent, merged", (owner, now + lease_seconds, now, key)).fetchone()
        lead = IncomingMessage.from_json(message)
        followers = [IncomingMessage.from_json(text) for text in json.loads(merged or "[]")]
        # Once a reply exists, its wording is fixed: later messages wait for their own turn.
        if debounce_seconds and reply_text is None and mergeable(lead):
            joined = self._merge_burst(c, lead, now, mergeable)
            if joined:
                followers += joined
                c.execute("UPDATE inbox SET merged = ? WHERE key = ?",
                          (json.dumps([m.to_json() for m in followers]), lead.dedupe_key))
        return ClaimedMessage(lead, owner, "sending" if status == "sending" else "queued", attempts, reply_text,
                              outcome, send_started_at, received_at, parts_sent, tuple(followers))

    @staticmethod
    def _merge_burst(c: sqlite3.Connection, lead: IncomingMessage, now: float,
                     mergeable: Callable[[IncomingMessage], bool]) -> list[IncomingMessage]:
        """The chat's next queued messages join the lead's reply, up to the first one that must stand alone."""
        merged: list[IncomingMessage] = []
        rows = c.execute("SELECT key, message, attempts, reply_text, next_attempt_at FROM inbox WHERE chat_key = ?"
                         " AND status = 'queued' AND key != ? ORDER BY sort_ts, rowid",
                         (lead.chat_key, lead.dedupe_key)).fetchall()
        for key, text, attempts, reply_text, next_attempt_at in rows:
            follower = IncomingMessage.from_json(text)
            # A message that was already tried has its own reply (maybe half sent): it keeps its turn.
            if attempts or reply_text is not None or next_attempt_at > now or not mergeable(follower):
                break
            c.execute("UPDATE inbox SET status = 'merged', merged_into = ?, updated_at = ? WHERE key = ?",
                      (lead.dedupe_key, now, key))
            merged.append(follower)
        return merged

    def renew_leases(self, keys: Iterable[str], owner: str, *, lease_seconds: float) -> int:
        """Extend the leases `owner` still holds among `keys`, in one step; returns how many it holds."""
        now, keys = self.clock(), list(keys)

        def work(c: sqlite3.Connection) -> int:
            renewed = 0
            for start in range(0, len(keys), 500):  # well under SQLite's bound on parameters
                chunk = keys[start:start + 500]
                renewed += c.execute(
                    f"UPDATE inbox SET lease_expires_at = ? WHERE key IN ({','.join('?' * len(chunk))})"
                    " AND lease_owner = ? AND status IN ('processing', 'sending')",
                    (now + lease_seconds, *chunk, owner)).rowcount
            return renewed

        return self._transaction(work) if keys else 0

    def begin_send(self, key: str, owner: str, *, parts: list[str], reply: tuple[str, str] | None = None,
                   llm_cost_usd: float = 0.0) -> str:
        """Last check before sendText: 'send', 'yield' (an earlier message of the chat showed up),
        'paused' (a human took the chat over meanwhile) or 'lost' (the lease went to another worker).

        A new `reply` (text, outcome) is stored in the same step, so a retry resends the same words.
        `llm_cost_usd`, what writing it cost, is added to the shared total whatever the verdict: it was spent.
        """
        now = self.clock()

        def work(c: sqlite3.Connection) -> str:
            if llm_cost_usd > 0:
                self._bump(c, LLM_COST_COUNTER, round(llm_cost_usd * 1e9))
            row = c.execute("SELECT status, lease_owner, chat_key, parts_sent FROM inbox WHERE key = ?",
                            (key,)).fetchone()
            if row is None or row[1] != owner or row[0] not in ("processing", "sending"):
                return "lost"
            chat_key, already_sending = row[2], row[0] == "sending" or row[3] > 0
            if not already_sending and c.execute(EARLIER_OPEN_SQL, {"key": key}).fetchone():
                # Answering now would overtake a message the customer sent first.
                c.execute("UPDATE inbox SET status = 'queued', attempts = attempts - 1, lease_owner = NULL,"
                          " lease_expires_at = 0, next_attempt_at = ?, reply_text = NULL, outcome = NULL,"
                          " parts_sent = 0, updated_at = ? WHERE key = ?", (now, now, key))
                c.execute("UPDATE inbox SET status = 'queued', merged_into = NULL WHERE merged_into = ?", (key,))
                c.execute("UPDATE inbox SET merged = NULL WHERE key = ?", (key,))
                return "yield"
            paused = c.execute("SELECT 1 FROM chat_state WHERE chat_key = ? AND paused_until > ?",
                               (chat_key, now)).fetchone()
            if paused and not already_sending:
                return "paused"
            # Remember what we are about to say, so our own echo (message.any) is never taken for a human.
            c.executemany("INSERT INTO sent (chat_key, text_hash, sent_at) VALUES (?, ?, ?)",
                          [(chat_key, text_fingerprint(part), now) for part in parts])
            if reply is not None:
                c.execute("UPDATE inbox SET reply_text = ?, outcome = ?, parts_sent = 0 WHERE key = ?", (*reply, key))
            c.execute("UPDATE inbox SET status = 'sending', send_started_at = ?, updated_at = ? WHERE key = ?",
                      (now, now, key))
            return "send"

        return self._transaction(work)

    def mark_part_sent(self, key: str, owner: str, *, parts_sent: int, sent_message_id: str | None) -> bool:
        """Progress of a reply sent in parts: a retry resumes after the last part WAHA accepted.

        False when the lease went to another worker meanwhile: this worker must stop sending.
        """
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            if sent_message_id:
                c.execute("INSERT INTO sent (chat_key, text_hash, bare_id, sent_at)"
                          " SELECT chat_key, '', ?, ? FROM inbox WHERE key = ?",
                          (bare_message_id(sent_message_id), now, key))
            return bool(c.execute(
                "UPDATE inbox SET parts_sent = ?, sent_message_id = COALESCE(?, sent_message_id),"
                " send_started_at = ?, updated_at = ? WHERE key = ? AND lease_owner = ?",
                (parts_sent, sent_message_id, now, now, key, owner)).rowcount)

        return self._transaction(work)

    def finish(self, key: str, owner: str, *, outcome: str, sent_message_id: str | None,
               history: tuple[str, str] | None = None, last_part_id: str | None = None) -> None:
        """The reply is out (or deliberately not sent: outcome 'skipped'); merged messages finish with it.

        Unlike the other updates this one does not require the lease: once WAHA took the text, the
        message is answered even if our lease ran out meanwhile, and saying so prevents a second copy.
        """
        now = self.clock()

        def work(c: sqlite3.Connection) -> None:
            row = c.execute(
                "UPDATE inbox SET status = 'done', outcome = ?, sent_message_id = COALESCE(?, sent_message_id),"
                " lease_owner = NULL, reply_text = NULL, finished_at = ?, updated_at = ? WHERE key = ?"
                " AND status != 'done' RETURNING chat_key", (outcome, sent_message_id, now, now, key)).fetchone()
            if row is None:
                return
            if last_part_id:  # so its echo (message.any) is known as ours, like the earlier parts
                c.execute("INSERT INTO sent (chat_key, text_hash, bare_id, sent_at) VALUES (?, '', ?, ?)",
                          (row[0], bare_message_id(last_part_id), now))
            followers = c.execute(
                "UPDATE inbox SET status = 'done', outcome = ?, finished_at = ?, updated_at = ? WHERE merged_into = ?"
                " AND status = 'merged'", ("merged" if outcome == "success" else outcome, now, now, key)).rowcount
            # A fallback reply means the LLM failed: the customer got an apology, not an answer. A notice
            # ("too many messages") is not an answer either.
            counter = {"fallback": "messages_failed", "skipped": "messages_skipped",
                       "notice": "messages_skipped"}.get(outcome, "messages_processed")
            self._bump(c, counter, 1 + followers)
            if history is not None:
                c.executemany("INSERT INTO history (chat_key, role, content, created_at) VALUES (?, ?, ?, ?)",
                              [(row[0], "user", history[0], now), (row[0], "assistant", history[1], now)])

        self._transaction(work)

    def record_failure(self, key: str, owner: str, error: str, *, max_attempts: int, retry_in: float) -> str:
        """After a failed attempt: 'retry' (due again later) or 'failed' once attempts are used up."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> str:
            row = c.execute("SELECT attempts FROM inbox WHERE key = ? AND lease_owner = ?", (key, owner)).fetchone()
            if row is None:
                return "lost"
            if row[0] >= max_attempts:
                c.execute("UPDATE inbox SET status = 'failed', last_error = ?, lease_owner = NULL, finished_at = ?,"
                          " updated_at = ? WHERE key = ?", (error[:500], now, now, key))
                followers = c.execute("UPDATE inbox SET status = 'failed', finished_at = ?, updated_at = ?"
                                      " WHERE merged_into = ? AND status = 'merged'", (now, now, key)).rowcount
                self._bump(c, "messages_failed", 1 + followers)
                self._bump(c, "messages_undelivered", 1 + followers)
                return "failed"
            c.execute("UPDATE inbox SET status = 'queued', last_error = ?, lease_owner = NULL, lease_expires_at = 0,"
                      " next_attempt_at = ?, updated_at = ? WHERE key = ?", (error[:500], now + retry_in, now, key))
            return "retry"

        return self._transaction(work)

    def release(self, key: str, owner: str) -> None:
        """Hand a message back untried (shutdown, crash in our code): due at once, attempt not counted.

        A message caught mid-send keeps status 'sending', so whoever takes it next checks
        WAHA before sending again. Merged messages stay with it.
        """
        now = self.clock()
        self._transaction(lambda c: c.execute(
            "UPDATE inbox SET status = CASE status WHEN 'sending' THEN 'sending' ELSE 'queued' END,"
            " attempts = MAX(attempts - 1, 0), lease_owner = NULL, lease_expires_at = 0, next_attempt_at = ?,"
            " updated_at = ? WHERE key = ? AND lease_owner = ? AND status IN ('processing', 'sending')",
            (now, now, key, owner)))

    def expire_leases(self) -> int:
        """At server start every lease belongs to a process that is gone: make their messages due now."""
        return self._transaction(lambda c: c.execute(
            "UPDATE inbox SET lease_expires_at = 0, lease_owner = NULL WHERE status IN ('processing', 'sending')"
        ).rowcount)

    def prune(self, *, older_than: float, history_older_than: float) -> int:
        """Forget finished messages past the retention and conversation turns past their TTL."""
        def work(c: sqlite3.Connection) -> int:
            removed = c.execute("DELETE FROM inbox WHERE status IN ('done', 'failed') AND finished_at < ?",
                                (older_than,)).rowcount
            c.execute("DELETE FROM history WHERE created_at < ?", (history_older_than,))
            c.execute("DELETE FROM sent WHERE sent_at < ?", (older_than,))
            return removed

        return self._transaction(work)

    # --- conversation and chat policy ------------------------------------------------------------

    def history(self, chat_key: str, *, since: float, limit: int) -> list[tuple[str, str]]:
        """The chat's latest turns, oldest first."""
        rows = self._transaction(lambda c: c.execute(
            "SELECT role, content FROM history WHERE chat_key = ? AND created_at >= ? ORDER BY id DESC LIMIT ?",
            (chat_key, since, limit)).fetchall(), begin="BEGIN")
        return [(role, content) for role, content in reversed(rows)]

    def clear_history(self, chat_key: str) -> None:
        self._transaction(lambda c: c.execute("DELETE FROM history WHERE chat_key = ?", (chat_key,)))

    def pause_chat(self, chat_key: str, *, until: float, reason: str) -> None:
        """Stop answering a chat until `until` (0 resumes it)."""
        self._transaction(lambda c: c.execute(
            "INSERT INTO chat_state (chat_key, paused_until, pause_reason) VALUES (?, ?, ?) ON CONFLICT (chat_key)"
            # Resuming (0) always wins; otherwise the later pause wins, so a reply typed by a person
            # cannot shorten an operator's open-ended "/bot off".
            " DO UPDATE SET paused_until = CASE WHEN excluded.paused_until = 0 OR excluded.paused_until"
            " > paused_until THEN excluded.paused_until ELSE paused_until END, pause_reason = CASE WHEN"
            " excluded.paused_until = 0 THEN NULL WHEN excluded.paused_until > paused_until"
            " THEN excluded.pause_reason ELSE pause_reason END",
            (chat_key, until, reason if until else None)))

    def set_opted_out(self, chat_key: str, opted_out: bool) -> bool:
        """Record the customer's choice; returns whether the chat is paused right now."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> bool:
            c.execute("INSERT INTO chat_state (chat_key, opted_out) VALUES (?, ?) ON CONFLICT (chat_key)"
                      " DO UPDATE SET opted_out = excluded.opted_out", (chat_key, int(opted_out)))
            return bool(c.execute("SELECT 1 FROM chat_state WHERE chat_key = ? AND paused_until > ?",
                                  (chat_key, now)).fetchone())

        return self._transaction(work)

    def known_sent_ids(self, message_ids: list[str]) -> set[str]:
        """Which of these WAHA message ids (bare form) we already recorded as ours."""
        bare = [b for b in map(bare_message_id, message_ids) if b]
        if not bare:
            return set()
        marks = ",".join("?" * len(bare))
        return {row[0] for row in self._transaction(lambda c: c.execute(
            f"SELECT bare_id FROM sent WHERE bare_id IN ({marks})", bare).fetchall(), begin="BEGIN")}

    def is_our_message(self, chat_key: str, *, message_id: str | None, text: str | None, within: float) -> bool:
        """Did this server send it? By WAHA's message id, or by the same words to the same chat just now."""
        since = self.clock() - within

        def work(c: sqlite3.Connection) -> bool:
            bare = bare_message_id(message_id)
            if bare and c.execute("SELECT 1 FROM sent WHERE bare_id = ?", (bare,)).fetchone():
                return True
            fingerprint = text_fingerprint(text)
            return bool(fingerprint and c.execute(
                "SELECT 1 FROM sent WHERE chat_key = ? AND text_hash = ? AND sent_at >= ?",
                (chat_key, fingerprint, since)).fetchone())

        return self._transaction(work, begin="BEGIN")

    def admit(self, chat_key: str, *, texts: list[str], per_minute: int, per_day: int, loop_repeats: int,
              loop_window: float, loop_pause: float) -> Admission:
        """Decide, in the chat's turn, whether it gets an answer: pause, opt-out, loops, then rate limits.

        A merged burst counts once (it costs one LLM call). Replies beyond a limit still count, so a
        flood cannot reset its own window, and the polite notice goes out at most once an hour.
        """
        now = self.clock()
        today = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")

        def work(c: sqlite3.Connection) -> Admission:
            c.execute("INSERT INTO chat_state (chat_key) VALUES (?) ON CONFLICT (chat_key) DO NOTHING", (chat_key,))
            paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at = c.execute(
                "SELECT paused_until, opted_out, minute_start, minute_count, day, day_count, notice_at"
                " FROM chat_state WHERE chat_key = ?", (chat_key,)).fetchone()
            if paused_until > now:
                return Admission("paused")
            if opted_out:
                return Admission("opted_out")
            if self._looks_like_a_loop(c, chat_key, texts, since=now - loop_window, repeats=loop_repeats):
                c.execute("UPDATE chat_state SET paused_until = ?, pause_reason = 'loop' WHERE chat_key = ?",
                          (now + loop_pause, chat_key))
                return Admission("loop")
            if now - minute_start >= 60:
                minute_start, minute_count = now, 0
            if day != today:
                day, day_count = today, 0
            minute_count, day_count = minute_count + 1, day_count + 1
            verdict = "daily_cap" if day_count > per_day else "rate_limited" if minute_count > per_minute else "ok"
            notice = verdict != "ok" and now - notice_at >= 3600
            c.execute("UPDATE chat_state SET minute_start = ?, minute_count = ?, day = ?, day_count = ?,"
                      " notice_at = ? WHERE chat_key = ?",
                      (minute_start, minute_count, day, day_count, now if notice else notice_at, chat_key))
            return Admission(verdict, notice)

        return self._transaction(work)

    @staticmethod
    def _looks_like_a_loop(c: sqlite3.Connection, chat_key: str, texts: list[str], *, since: float,
                           repeats: int) -> bool:
        """Another bot, not a person: the same message over and over, or our own longer reply echoed back."""
        for text in texts:
            fingerprint = text_fingerprint(text)
            same = c.execute("SELECT COUNT(*) FROM inbox WHERE chat_key = ? AND text_hash = ? AND received_at >= ?"
                             " AND merged_into IS NULL", (chat_key, fingerprint, since)).fetchone()[0]
            # Short words ("ok", "obrigado") are echoed by people all the time; a paragraph is not.
            echoed = len(text) >= ECHO_MIN_CHARS and c.execute(
                "SELECT 1 FROM sent WHERE chat_key = ? AND text_hash = ? AND sent_at >= ?",
                (chat_key, fingerprint, since)).fetchone()
            if same >= repeats or echoed:
                return True
        return False

    # --- reporting -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters, unfinished messages and chat states, read in one (non-locking) transaction."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> dict[str, Any]:
            counters = dict(c.execute("SELECT name, value FROM counters").fetchall())
            by_status = dict(c.execute(
                f"SELECT status, COUNT(*) FROM inbox WHERE status IN {OPEN_STATUSES_SQL} GROUP BY status").fetchall())
            retrying = c.execute("SELECT COUNT(*) FROM inbox WHERE status = 'queued' AND last_error IS NOT NULL"
                                 ).fetchone()[0]
            paused = dict(c.execute("SELECT pause_reason, COUNT(*) FROM chat_state WHERE paused_until > ?"
                                    " GROUP BY pause_reason", (now,)).fetchall())
            opted_out = c.execute("SELECT COUNT(*) FROM chat_state WHERE opted_out = 1").fetchone()[0]
            return {"counters": counters, "by_status": by_status, "retrying": retrying, "paused": paused,
                    "opted_out": opted_out}

        return self._transaction(work, begin="BEGIN")

    def ping(self) -> None:
        """A real write: a store that can be read but not written cannot take new messages."""
        self.count("health_checks")

    def set_health(self, name: str, status: CheckStatus, reason: str, *, max_parts: int = 200) -> None:
        """Record a part's state; `since` moves only when the status changes. New parts stop at `max_parts`."""
        now = self.clock()

        def work(c: sqlite3.Connection) -> None:
            part = name.split(":", 1)[0]
            known = c.execute("SELECT 1 FROM health WHERE name = ?", (name,)).fetchone()
            if not known and c.execute("SELECT COUNT(*) FROM health WHERE name = ? OR name LIKE ?",
                                       (part, part + ":%")).fetchone()[0] >= max_parts:
                return
            c.execute("INSERT INTO health (name, status, reason, since, updated_at) VALUES (?, ?, ?, ?, ?)"
                      " ON CONFLICT (name) DO UPDATE SET since = CASE WHEN health.status = excluded.status"
                      " THEN health.since ELSE excluded.since END, status = excluded.status,"
                      " reason = excluded.reason, updated_at = excluded.updated_at",
                      (name, str(status), reason[:500], now, now))

        self._transaction(work)

    def health_reports(self) -> dict[str, HealthCheck]:
        """Every recorded part state, by name."""
        rows = self._transaction(lambda c: c.execute("SELECT name, status, reason, since FROM health").fetchall(),
                                 begin="BEGIN")
        return {name: HealthCheck(status=CheckStatus(status), reason=reason, since=since)
                for name, status, reason, since in rows}

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local = threading.local()


# ---------------------------------------------------------------------------
# Metrics (Prometheus). Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before
# this module is imported, so every worker writes its own files and /metrics adds them up.
# ---------------------------------------------------------------------------

MESSAGES_RECEIVED = Counter("webhook_messages_received", "Customer messages recorded for a reply")
MESSAGES_PROCESSED = Counter("webhook_messages_processed", "Messages answered (LLM reply or text-only note)")
MESSAGES_FAILED = Counter("webhook_messages_failed",
                          "Messages answered with the fallback, or given up after every attempt", ["reason"])
PROCESSING_SECONDS = Histogram("webhook_processing_duration_seconds",
                               "From the message being recorded to its reply reaching WAHA",
                               buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300, 900))
MESSAGES_SKIPPED = Counter("webhook_messages_skipped",
                           "Messages deliberately left unanswered: chat paused, opted out, loop or over a limit")
MESSAGES_IGNORED = Counter("webhook_messages_ignored", "Events deliberately not answered", ["reason"])
REQUESTS_REJECTED = Counter("webhook_requests_rejected", "Webhook requests refused", ["status"])
LLM_SECONDS = Histogram("webhook_llm_duration_seconds", "LLM call time, retries included",
                        buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60))
LLM_ERRORS = Counter("webhook_llm_errors", "Failed LLM attempts", ["status"])
LLM_TOKENS = Counter("webhook_llm_tokens", "Tokens used by successful LLM calls", ["kind"])
LLM_COST_USD = Counter("webhook_llm_cost_usd", "What the LLM provider reported the replies cost (usage.cost), USD")
LLM_MODEL_UNAVAILABLE = Counter("webhook_llm_model_unavailable",
                                "LLM answers saying a configured model is not served (a configuration error)",
                                ["model"])
WAHA_ERRORS = Counter("webhook_waha_errors", "Failed WAHA calls", ["endpoint", "status"])
REPLIES_IN_FLIGHT = Gauge("webhook_replies_in_flight", "Replies being prepared or sent right now",
                          multiprocess_mode="livesum")


def metrics_document() -> tuple[bytes, str]:
    """The Prometheus text exposition, summed over all gunicorn workers when running under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry(support_collectors_without_names=True)
        prometheus_multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------
# Upstream errors shared by the LLM and WAHA clients
# ---------------------------------------------------------------------------

class UpstreamError(Exception):
    """A call to the LLM or to WAHA failed; `transient` says whether trying again can help."""

    service = "upstream"

    def __init__(self, message: str, *, status: int | None = None, transient: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.service}: {self.args[0]}{status}"


class LLMError(UpstreamError):
    service = "llm"


class EmptyReplyError(LLMError):
    """The LLM answered 200 without usable text; worth one quick retry, not many."""


class ModelUnavailableError(LLMError):
    """The server does not serve this model id (retired, misspelt, not pulled): a configuration error.

    Trying again cannot help; trying the next configured model can.
    """

    def __init__(self, message: str, *, model: str, **details: Any) -> None:
        super().__init__(message, transient=False, **details)
        self.model = model


# How OpenRouter, OpenAI-style servers, Ollama, vLLM and llama.cpp say a model id is not served.
MODEL_UNAVAILABLE_PATTERN = re.compile(
    r"no endpoints found|not a valid model|model[^.]{0,80}(?:not found|does not exist|not exist)|unknown model"
    r"|model_not_found|invalid model (?:name|id)", re.IGNORECASE)


def model_unavailable_model(status: int | None, message: str, *, requested: str,
                            candidates: Iterable[str] = ()) -> str | None:
    """Which model an error says is not served, or None when the error is about something else.

    Only 400 and 404 answers (or an error inside a 200) whose text says so, or a 404 that names the
    model: a bare 404 is more often a base URL without its /v1. The model named in the text wins
    (OpenRouter names the last one of a `models` list it tried).
    """
    named = [m for m in (*candidates, requested) if m in message]
    if status not in (400, 404, 200, None) or not (
            MODEL_UNAVAILABLE_PATTERN.search(message) or (status == 404 and named)):
        return None
    return max(named, key=len) if named else requested


class WahaError(UpstreamError):
    service = "waha"

    def __init__(self, message: str, *, maybe_delivered: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        # The request left but no answer came back: WAHA may have sent the text anyway.
        self.maybe_delivered = maybe_delivered


TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _error_message(response: httpx.Response) -> str:
    """A short, secret-free description of an upstream error body."""
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason_phrase or "no body")[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            metadata = error.get("metadata") if isinstance(error.get("metadata"), dict) else {}
            extra = " ".join(f"{k}={metadata[k]}" for k in ("error_type", "provider_name") if metadata.get(k))
            return f"{message} {extra}".strip()[:200]
        for key in ("error", "message"):
            if body.get(key):
                return str(body[key])[:200]
    return json.dumps(body)[:200]


def _metric_status(error: UpstreamError) -> str:
    """A small, fixed set of label values: the HTTP status, or what went wrong without one."""
    if error.status is not None:
        return str(error.status)
    return "timeout" if "timed out" in str(error.args[0]) else "connection"


def _backoff_seconds(attempt: int, *, base: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with +/-25% jitter, so retries from many chats do not line up."""
    return base * (2 ** (attempt - 1)) * (0.75 + 0.5 * rng())


WAHA_MAX_CONNECTIONS = 100  # per worker; sendText takes milliseconds, so far fewer than LLM calls


class ShardedPoolTransport(httpx.AsyncBaseTransport):
    """Several small connection pools behind one transport; each request goes to the least busy pool.

    httpcore re-examines every connection of a pool (a readability check with getpeername
    and poll on each idle one) whenever a request starts or ends, so with a few hundred LLM
    calls in flight one big pool spent more of the event loop's time than everything else
    the reply pipeline does (bench/README.md, "Where the time went"). Pools of
    CONNECTIONS_PER_SHARD keep that walk short.
    """

    CONNECTIONS_PER_SHARD = 8

    def __init__(self, *, max_connections: int) -> None:
        count = max(1, math.ceil(max_connections / self.CONNECTIONS_PER_SHARD))
        size = math.ceil(max_connections / count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        tls = httpx.create_ssl_context()  # loading the CA bundle costs ~25 ms: once, not per pool
        self._shards = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(count)]
        self._busy = [0] * count

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    @property
    def requests_in_flight(self) -> int:
        return sum(self._busy)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._shards)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        response.stream = _ReleasingStream(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self._busy[index] -= 1

    async def aclose(self) -> None:
        errors = [e for e in await asyncio.gather(*(shard.aclose() for shard in self._shards), return_exceptions=True)
                  if e is not None]
        if errors:  # every pool was still closed
            raise errors[0]


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that tells its pool's counter when it is closed (read to the end or abandoned)."""

    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._release is not None:  # once, however often the body is closed
                self._release, release = None, self._release
                release()


def upstream_client(*, transport: httpx.AsyncBaseTransport | None, max_connections: int,
                    timeout: httpx.Timeout) -> httpx.AsyncClient:
    """A worker's client for one upstream: small pools side by side, or httpx's own pool behind a proxy.

    httpx honours HTTP(S)_PROXY only with its default transport, so where the environment
    names a proxy that one is kept (with a bounded keep-alive set, which keeps its walk short).
    """
    proxied = bool({"http", "https", "all"} & urllib.request.getproxies_environment().keys())  # what httpx reads
    if transport is None and not proxied:
        transport = ShardedPoolTransport(max_connections=max_connections)
    return httpx.AsyncClient(transport=transport, timeout=timeout, limits=httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=min(max_connections, 64)))


# ---------------------------------------------------------------------------
# LLM client (OpenRouter or any OpenAI-compatible chat completions API)
# ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LLMReply:
    text: str
    model: str | None  # the model that answered, as the server reports it
    usage: Mapping[str, Any]
    attempts: int
    latency_seconds: float
    answered_by: str  # which of the configured ids wrote it
    configured_model: str
    unserved_models: tuple[str, ...] = ()  # configured models this worker currently knows are not served

    @property
    def cost_usd(self) -> float | None:
        """What the provider says this call cost (OpenRouter's usage.cost); None when it does not say."""
        cost = self.usage.get("cost")
        return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0 else None

    @property
    def from_fallback(self) -> bool:
        """True when a model other than the configured one wrote the reply."""
        return self.answered_by != self.configured_model


def served_model(answered: str | None, candidates: Iterable[str]) -> str | None:
    """Which requested id an answer's `model` is: equal, or a dated/variant form of it (longest match wins)."""
    if answered is None:
        return None
    matches = [m for m in candidates if answered == m or answered.startswith((m + "-", m + ":", m + "@"))]
    return max(matches, key=len) if matches else None


class UnservedModels:
    """The configured models this worker has been told are not served, each for RECHECK_SECONDS.

    While the configured model is known to be gone, requests start at the first fallback that may
    be served, so a retired id costs one failed request every few minutes, not one per message.
    """

    RECHECK_SECONDS = 600.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}

    def mark(self, model: str) -> None:
        self._until[model] = self.clock() + self.RECHECK_SECONDS

    def served(self, model: str) -> None:
        self._until.pop(model, None)

    def is_unserved(self, model: str) -> bool:
        until = self._until.get(model)
        if until is not None and until <= self.clock():
            del self._until[model]
            return False
        return until is not None

    def order(self, models: tuple[str, ...]) -> list[str]:
        """The models worth asking now, in configured order; all of them when every one is marked."""
        usable = [m for m in models if not self.is_unserved(m)]
        return usable or list(models)


class EveryMinute:
    """Log a recurring configuration error once a minute per key, with how many were not logged."""

    def __init__(self, *, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """None when this occurrence stays quiet; else how many were kept quiet since the last line."""
        now = self.clock()
        if key in self._last and now - self._last[key] < self.interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._quiet.pop(key, 0)


class LLMClient:
    """Asks the chat completions endpoint for one reply, with bounded retries under one deadline."""

    def __init__(self, *, http: httpx.AsyncClient, base_url: str, api_key: str, model: str,
                 fallback_models: Iterable[str] = (), openrouter: bool = False,
                 reasoning_effort: str | None = None,
                 max_tokens: int = 512, temperature: float = 0.7, attempt_timeout: float = 30.0,
                 deadline: float = 45.0, max_attempts: int = 3, retry_after_cap: float = 5.0,
                 backoff_base: float = 0.5, app_title: str | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.models = tuple(dict.fromkeys((model, *fallback_models)))
        # OpenRouter tries a `models` list itself; any other server gets one model per request.
        self.openrouter = openrouter
        self.reasoning_effort = reasoning_effort
        self.unserved = UnservedModels(clock=clock)
        self._config_errors = EveryMinute(clock=clock)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.retry_after_cap = retry_after_cap
        self.backoff_base = backoff_base
        self.sleep = sleep
        self.rng = rng
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if app_title:
            self.headers["X-Title"] = app_title

    def _body(self, messages: list[dict[str, str]], models: list[str], user: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": models[0], "messages": messages,
                                "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.openrouter:
            if len(models) > 1:
                body["models"] = models
            if self.reasoning_effort:
                # The fallback is a thinking model: unbounded thinking can spend all of max_tokens and
                # come back empty (openrouter.md §6.7). The reply never shows the reasoning anyway.
                body["reasoning"] = {"effort": self.reasoning_effort, "exclude": True}
        if user:
            body["user"] = user
        return body

    async def complete(self, messages: list[dict[str, str]], *, user: str | None = None,
                       log_context: str = "") -> LLMReply:
        """Return the reply text, or raise LLMError once retries, models or the deadline are used up."""
        models = self.unserved.order(self.models)
        body = self._body(messages, models, user)
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_at = started + self.deadline
        empty_retried = False
        attempt = 0
        while True:
            attempt += 1
            remaining = give_up_at - loop.time()
            try:
                async with asyncio.timeout(min(self.attempt_timeout, remaining)):
                    text, model, usage = await self._attempt(body)
                LLM_SECONDS.observe(loop.time() - started)
                for kind in ("prompt_tokens", "completion_tokens"):
                    if isinstance(usage.get(kind), int):
                        LLM_TOKENS.labels(kind.removesuffix("_tokens")).inc(usage[kind])
                # Only OpenRouter picks among `models` itself; elsewhere the answer is from what we asked for
                # (llama.cpp, for one, reports whatever name it likes).
                answered_by = (served_model(model, models) if self.openrouter else None) or models[0]
                self.unserved.served(answered_by)
                reply = LLMReply(text=text, model=model, usage=usage, attempts=attempt,
                                 latency_seconds=loop.time() - started, answered_by=answered_by,
                                 configured_model=self.model,
                                 unserved_models=tuple(m for m in self.models if self.unserved.is_unserved(m)))
                if reply.cost_usd:
                    LLM_COST_USD.inc(reply.cost_usd)
                return reply
            except TimeoutError:
                error: LLMError = LLMError(f"timed out: no answer within {min(self.attempt_timeout, remaining):.1f}s",
                                           transient=True)
            except LLMError as exc:
                error = exc
            LLM_ERRORS.labels(_metric_status(error)).inc()
            if isinstance(error, ModelUnavailableError):
                self._report_unserved(error, log_context)
                models = [m for m in models if m != error.model]
                if not models:
                    raise error
                body = self._body(messages, models, user)
                attempt -= 1  # another model is a new request, not a retry of a transient failure
                continue
            if isinstance(error, EmptyReplyError):
                if empty_retried:
                    raise error
                empty_retried = True
            if not error.transient or attempt >= self.max_attempts:
                raise error
            if error.retry_after is not None and error.retry_after > self.retry_after_cap:
                raise LLMError(f"asked to retry after {error.retry_after:.0f}s, more than we wait: {error.args[0]}",
                               status=error.status, transient=False)
            delay = error.retry_after if error.retry_after is not None else _backoff_seconds(
                attempt, base=self.backoff_base, rng=self.rng)
            if loop.time() + delay >= give_up_at:
                raise error
            log.warning("%s llm attempt %d failed, retrying in %.2fs: %s", log_context, attempt, delay, error)
            await self.sleep(delay)

    def _report_unserved(self, error: ModelUnavailableError, log_context: str) -> None:
        self.unserved.mark(error.model)
        LLM_MODEL_UNAVAILABLE.labels(error.model).inc()
        quiet = self._config_errors.due(error.model)
        if quiet is None:
            return
        setting = "OPENROUTER_MODEL" if error.model == self.model else "OPENROUTER_FALLBACK_MODELS"
        log.error("%s llm model_unavailable model=%s setting=%s: %s answered that it does not serve this model "
                  "(%s). Set %s to a served id; `python whatsapp_webhook_server.py --check` lists them.%s",
                  log_context, error.model, setting, self.base_url, error.args[0], setting,
                  f" ({quiet} more such answers in the last minute)" if quiet else "")

    async def _attempt(self, body: dict[str, Any]) -> tuple[str, str | None, Mapping[str, Any]]:
        try:
            response = await self.http.post(self.url, json=body, headers=self.headers)
        except httpx.TimeoutException:
            raise LLMError("request timed out", transient=True) from None
        except httpx.TransportError as exc:
            raise LLMError(f"connection failed: {type(exc).__name__}", transient=True) from None
        if response.status_code != 200:
            message = _error_message(response)
            unserved = model_unavailable_model(response.status_code, message, requested=body["model"],
                                               candidates=body.get("models") or [body["model"]])
            if unserved is not None:
                raise ModelUnavailableError(message, model=unserved, status=response.status_code)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            # A 402 is final unless OpenRouter says when to come back (its in-flight budget limit).
            transient = response.status_code in TRANSIENT_STATUSES or (
                response.status_code == 402 and retry_after is not None)
            raise LLMError(message, status=response.status_code, transient=transient, retry_after=retry_after)
        return self._reply_from(response, body)

    @staticmethod
    def _reply_from(response: httpx.Response, body: Mapping[str, Any]) -> tuple[str, str | None, Mapping[str, Any]]:
        """Apply OpenRouter's rule: a 200 is a reply only with choices, no error and non-empty content."""
        try:
            data = response.json()
        except ValueError:
            raise LLMError("200 response is not JSON", status=200, transient=True) from None
        if not isinstance(data, dict):
            raise LLMError("200 response is not a JSON object", status=200, transient=True)
        if isinstance(data.get("error"), dict):
            code = data["error"].get("code")
            message = _error_message(response)
            unserved = model_unavailable_model(code if isinstance(code, int) else 200, message,
                                               requested=body["model"], candidates=body.get("models") or ())
            if unserved is not None:
                raise ModelUnavailableError(f"error in 200 body: {message}", model=unserved, status=200)
            raise LLMError(f"error in 200 body: {message}", status=200,
                           transient=not isinstance(code, int) or code in TRANSIENT_STATUSES)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError("200 response has no choices", status=200, transient=True)
        choice = choices[0]
        if choice.get("finish_reason") == "error" or isinstance(choice.get("error"), dict):
            code = choice["error"].get("code") if isinstance(choice.get("error"), dict) else None
            raise LLMError(f"provider failed while generating (finish_reason=error, code={code})", status=200,
                           transient=not isinstance(code, int) or code in TRANSIENT_STATUSES)
        if choice.get("finish_reason") == "content_filter":
            # What is left after filtering is not an answer we can stand behind.
            raise LLMError("reply withheld by the provider's content filter", status=200, transient=False)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            reason = choice.get("finish_reason")
            raise EmptyReplyError(f"empty content (finish_reason={reason})", status=200, transient=True)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        model = data.get("model") if isinstance(data.get("model"), str) else None
        return content.strip(), model, usage


# ---------------------------------------------------------------------------
# WAHA client
# ---------------------------------------------------------------------------

class WahaClient:
    """The few WAHA calls a reply needs; every body carries `session` and matches WAHA's OpenAPI spec."""

    def __init__(self, *, http: httpx.AsyncClient, base_url: str, api_key: str, send_attempts: int = 3,
                 backoff_base: float = 1.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Api-Key": api_key}
        self.send_attempts = send_attempts
        self.backoff_base = backoff_base
        self.sleep = sleep
        self.rng = rng

    async def send_text(self, *, session: str, chat_id: str, text: str, reply_to: str | None = None) -> str | None:
        """Send a text (quoting `reply_to` if given); return the sent message id when the engine's response has one."""
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "text": text}
        if reply_to:
            body["reply_to"] = reply_to
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._post("/api/sendText", body)
                return extract_sent_message_id(response)
            except WahaError as exc:
                # Resending after a lost answer could give the customer two copies: the caller checks first.
                if not exc.transient or exc.maybe_delivered or attempt >= self.send_attempts:
                    raise
                delay = _backoff_seconds(attempt, base=self.backoff_base, rng=self.rng)
                log.warning("sendText attempt %d to chat=%s failed, retrying in %.2fs: %s", attempt, chat_id, delay, exc)
                await self.sleep(delay)

    async def send_seen(self, *, session: str, chat_id: str, message_id: str, participant: str | None = None) -> None:
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "messageIds": [message_id]}
        if participant:
            body["participant"] = participant
        await self._post("/api/sendSeen", body)

    async def start_typing(self, *, session: str, chat_id: str) -> None:
        await self._post("/api/startTyping", {"session": session, "chatId": chat_id})

    async def stop_typing(self, *, session: str, chat_id: str) -> None:
        await self._post("/api/stopTyping", {"session": session, "chatId": chat_id})

    async def find_sent_texts(self, *, session: str, chat_id: str, text: str, since: float) -> list[dict[str, Any]]:
        """Our own messages with exactly this text in the chat since `since` (unix seconds), newest first.

        Used when a send was cut off: the reply may or may not have left.
        """
        path = f"/api/{quote(session, safe='')}/chats/{quote(chat_id, safe='')}/messages"
        params = {"limit": 20, "downloadMedia": "false", "filter.fromMe": "true", "sortOrder": "desc",
                  "filter.timestamp.gte": int(since)}
        response = await self._request("GET", path, params=params)
        try:
            messages = response.json()
        except ValueError:
            raise WahaError(f"{path} answered with something that is not JSON", transient=False) from None
        if not isinstance(messages, list):
            raise WahaError(f"{path} answered with something that is not a list", transient=False)
        return [m for m in messages if isinstance(m, dict) and m.get("body") == text]

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._request("POST", path, json=body)

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            return await self._call(method, path, **options)
        except WahaError as exc:
            endpoint = path if path.startswith("/api/send") or path.endswith("Typing") else "chat_messages"
            WAHA_ERRORS.labels(endpoint, _metric_status(exc)).inc()
            raise

    async def _call(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, self.base_url + path, headers=self.headers, **options)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise WahaError(f"{path} could not connect: {type(exc).__name__}", transient=True) from None
        except httpx.TimeoutException as exc:
            raise WahaError(f"{path} timed out ({type(exc).__name__})", transient=True, maybe_delivered=True) from None
        except httpx.TransportError as exc:
            raise WahaError(f"{path} connection failed: {type(exc).__name__}", transient=True,
                            maybe_delivered=True) from None
        if response.status_code in (200, 201):
            return response
        # 422 = the WAHA session is not WORKING yet; it may recover in seconds. A 5xx may come
        # from an engine or proxy that gave up after the message left, so it may have been delivered.
        status = response.status_code
        raise WahaError(f"{path} failed: {_error_message(response)}", status=status,
                        transient=status == 422 or status in TRANSIENT_STATUSES, maybe_delivered=status >= 500)


def extract_sent_message_id(response: httpx.Response) -> str | None:
    """WAHA returns the engine's raw object: WEBJS `id._serialized`, NOWEB `key.id`, GOWS `ID`/`Info.ID`."""
    try:
        data = response.json()
    except ValueError:
        return None  # WEBJS 2025.6.5 answers 201 with an empty body
    if not isinstance(data, dict):
        return None
    candidates = [data.get("id"), data.get("key"), data.get("ID"), data.get("Info")]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            return candidate
        if isinstance(candidate, dict):
            for name in ("_serialized", "id", "ID"):
                if isinstance(candidate.get(name), str) and candidate[name]:
                    return candidate[name]
    return None


# ---------------------------------------------------------------------------
# Reply formatting: WhatsApp marks instead of Markdown, long replies in parts
# ---------------------------------------------------------------------------

def markdown_to_whatsapp(text: str) -> str:
    """Convert LLM-style Markdown to WhatsApp formatting; code is never modified."""
    stash: list[str] = []

    def keep(s: str) -> str:
        # Opaque tokens shield code and URLs from every regex that runs afterwards.
        stash.append(s)
        return f"\ue000{len(stash) - 1}\ue001"

    # Marks we emit are placeholders so later passes (e.g. italic) cannot re-read them.
    bold, ital, strike = "\ue002", "\ue003", "\ue004"
    fence = r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)"  # unclosed: to the end
    text = re.sub(fence, lambda m: keep(m[0]), text)
    text = re.sub(r"(`+)[^`\n]+\1", lambda m: keep(m[0]), text)
    url = r"((?:[^()\s]|\([^()\s]*\))+)"  # one level of parens, e.g. Wikipedia links
    text = re.sub(rf"!\[([^\]\n]*)\]\({url}\)",
                  lambda m: f"{m[1]}: {keep(m[2])}" if m[1] else keep(m[2]), text)
    text = re.sub(rf"\[([^\]\n]+)\]\({url}\)",
                  lambda m: keep(m[2]) if m[1] == m[2] else f"{m[1]} ({keep(m[2])})", text)
    # Trailing punctuation/marks usually belong to the sentence, not to the URL.
    text = re.sub(r"(?:https?://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]*_~]", lambda m: keep(m[0]), text)

    lines = []
    for line in text.split("\n"):
        if "|" in line and "-" in line and re.fullmatch(r"[\s|:-]+", line):
            continue  # table separator row carries no content
        if re.fullmatch(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*", line):
            line = ""  # horizontal rule
        elif m := re.fullmatch(r"[ \t]{0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*", line):
            line = bold + m[1].replace("**", "") + bold  # inner ** would close the bold early
        elif line.lstrip().startswith("|"):
            line = " | ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
        else:
            # "* item" would otherwise read as an unclosed WhatsApp bold mark.
            line = re.sub(r"^([ \t]*)[*+-][ \t]+", r"\1• ", line)
        lines.append(line)
    text = "\n".join(lines)

    # Longest marks first so "**" is never taken as two italics. Simplified flanking rule:
    # no space just inside the marks and no word char just outside (WhatsApp ignores
    # intra-word marks anyway, and it keeps 2*3*4 and snake_case intact).
    for marks, out in (("***", bold + ital), ("**", bold), ("__", bold), ("~~", strike),
                       ("*", ital), ("_", ital)):
        c, m = re.escape(marks[0]), re.escape(marks)
        text = re.sub(rf"(?<![\w{c}]){m}(?![\s{c}])([^\n]+?)(?<![\s{c}]){m}(?![\w{c}])",
                      lambda g: out + g[1] + out[::-1], text)
    for mark, char in ((bold, "*"), (ital, "_"), (strike, "~")):
        text = text.replace(mark, char)
    text = re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", text)  # 3+ blank lines -> 2
    token = re.compile("\ue000(\\d+)\ue001")

    def restore(m: re.Match[str]) -> str:
        return token.sub(restore, stash[int(m[1])])  # link URLs may hold inline-code tokens

    return token.sub(restore, text).strip()


def split_message(text: str, max_chars: int = 1500) -> list[str]:
    """Split text into stripped, non-empty parts of <= max_chars at the most natural boundary."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    text = text.strip()
    # Best boundary first; each match ends where the current part may end.
    breaks = [re.compile(p) for p in (r"(?=\n[ \t]*\n)", r"(?=\n)",
                                      r"[.!?…]+[\"'”’»)\]]*(?=\s)", r"(?=\s)")]
    fence = r"(?ms)^[ \t]*(`{3,}|~{3,})[^`\n]*$.*?(?:^[ \t]*\1[ \t]*$|\Z)"
    ws = re.compile(r"\s*")
    # Blocks that fit in one part must never be cut; oversized ones have to be.
    blocked = [m.span() for m in re.finditer(fence, text) if len(m[0]) <= max_chars]

    def best_cut(start: int) -> int:
        limit = start + max_chars
        # Lookaheads only inspect whitespace, so the scan can stop after the run at limit.
        end = ws.match(text, limit).end()
        for pattern in breaks:
            cuts = [c for m in pattern.finditer(text, start + 1, end)
                    if (c := m.end()) <= limit and not any(a < c < b for a, b in blocked)]
            if cuts:
                return cuts[-1]  # greedy: the latest boundary of the best kind
        return limit  # only a single word longer than max_chars gets here

    parts: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = best_cut(start)
        parts.append(text[start:cut].rstrip())
        start = ws.match(text, cut).end()
    return parts + [text[start:]] if text else []


# ---------------------------------------------------------------------------
# The reply pipeline: one claimed message from LLM call to sendText
# ---------------------------------------------------------------------------

PRESENCE_TIMEOUT_SECONDS = 3.0
CLAIM_BATCH = 32  # due messages taken per inbox transaction
# WhatsApp timestamps our messages with the phone's/server's clock, not ours.
CLOCK_SKEW_SECONDS = 10.0


def typing_pause_seconds(text: str, *, rng: Callable[[], float] = random.random) -> float:
    """A human-looking typing time: grows with the reply, 1-4 s, randomised (WAHA's anti-ban advice)."""
    return min(4.0, max(1.0, len(text) * 0.02)) * (0.8 + 0.4 * rng())


def trim_history(turns: Iterable[tuple[str, str]], *, max_chars: int) -> list[tuple[str, str]]:
    """Drop the oldest turns until the rest fit in max_chars and start with the customer's turn."""
    kept = list(turns)
    while kept and (sum(len(content) for _, content in kept) > max_chars or kept[0][0] != "user"):
        kept = kept[1:]
    return kept


def retry_delay_seconds(attempt: int, *, base: float) -> float:
    """Our own retries of a failed send: slower than WAHA's redelivery (2 s), so that goes first."""
    return min(base * 3 ** (attempt - 1), 15 * 60)


@dataclass(frozen=True, kw_only=True)
class ComposedReply:
    """What to send for a message: the text, its outcome, the turn to remember and what the LLM charged."""

    text: str
    outcome: str
    history: tuple[str, str] | None = None
    llm_cost_usd: float = 0.0


class ReplyPipeline:
    """Answers one claimed message (and the burst merged into it) and records the outcome in the inbox."""

    def __init__(self, *, settings: Settings, store: StateStore, llm: LLMClient, waha: WahaClient,
                 health: HealthReporter | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.waha = waha
        self.health = health or HealthReporter(store=store)
        self.sleep = sleep
        self.rng = rng
        self._notices = EveryMinute()

    async def _report(self, name: str, status: CheckStatus, reason: str) -> None:
        """Tell /health what this reply learned; costs a store write only when something changed."""
        if self.health.needs_write(name, status, reason):
            await asyncio.to_thread(self.health.report, name, status, reason)

    async def process(self, claimed: ClaimedMessage) -> None:
        message = claimed.message
        try:
            await self._reply(claimed)
        except BaseException as exc:
            # A bug or a shutdown: the message goes back to the inbox, due at once.
            await asyncio.shield(asyncio.to_thread(self.store.release, message.dedupe_key, claimed.lease_owner))
            if isinstance(exc, asyncio.CancelledError):
                log.info("event=%s chat=%s reply interrupted by shutdown; message handed back to the inbox",
                         message.event_id, message.chat_id)
            else:
                log.exception("event=%s chat=%s reply failed in our code; message handed back to the inbox",
                              message.event_id, message.chat_id)
            raise

    async def _reply(self, claimed: ClaimedMessage) -> None:
        message, owner, key = claimed.message, claimed.lease_owner, claimed.message.dedupe_key
        log.info("event=%s chat=%s decision=working attempt=%d merged=%d", message.event_id, message.chat_id,
                 claimed.attempts, len(claimed.merged))
        loop = asyncio.get_running_loop()
        started = loop.time()
        parts_sent = claimed.parts_sent
        typing_since: float | None = None  # set when typing already shows (it started with the LLM call)
        mid_send = claimed.previous_status == "sending" or parts_sent > 0
        # A reply whose sending began must be finished word for word; only an unsent fallback is rewritten.
        claimed_reply = claimed.reply_text is not None and (claimed.outcome != "fallback" or mid_send)
        if claimed_reply:
            # A reply was already written (and maybe partly sent): the customer must get exactly it.
            text, outcome, history = claimed.reply_text, claimed.outcome or "success", None
            if claimed.outcome == "success":
                history = ("\n".join(claimed.texts), text)
            parts = split_message(text, self.settings.max_message_chars)
            if claimed.previous_status == "sending" and parts_sent < len(parts):
                # The worker before us died mid-send: did that part leave?
                if await self._already_sent(claimed, part=parts[parts_sent], index=parts_sent,
                                            since=(claimed.send_started_at or time.time()) - CLOCK_SKEW_SECONDS):
                    parts_sent += 1
        else:
            presence = None
            if self.settings.typing_simulation:
                # Seen + typing while the LLM thinks, so the typing pause overlaps the LLM call.
                presence = asyncio.create_task(self._show_typing(message))
            try:
                composed = await self._compose(claimed)
            except BaseException:
                if presence is not None:
                    presence.cancel()
                raise
            if presence is not None:
                await presence
                typing_since = started
            if composed is None:  # deliberately not answered (paused, opted out, loop, over a limit)
                await self._finish(claimed, outcome="skipped", sent_message_id=None)
                if presence is not None:
                    await self._quietly("stopTyping", self.waha.stop_typing(session=message.session,
                                                                            chat_id=message.chat_id))
                return
            text, outcome, history, cost = composed.text, composed.outcome, composed.history, composed.llm_cost_usd
            parts, parts_sent = split_message(text, self.settings.max_message_chars), 0

        verdict = await asyncio.to_thread(self.store.begin_send, key, owner, parts=parts[parts_sent:],
                                          reply=None if claimed_reply else (text, outcome),
                                          llm_cost_usd=0.0 if claimed_reply else cost)
        if verdict == "paused":
            log.info("event=%s chat=%s decision=skipped reason=paused (a person took over while the reply was "
                     "being written)", message.event_id, message.chat_id)
            await self._finish(claimed, outcome="skipped", sent_message_id=None)
            return
        if verdict != "send":
            log.info("event=%s chat=%s decision=%s (%s)", message.event_id, message.chat_id, verdict,
                     "an earlier message of this chat goes first" if verdict == "yield" else "lease lost")
            return
        sent_id = last_part_id = None
        for index in range(parts_sent, len(parts)):
            await self._type(message, parts[index], since=typing_since)
            typing_since = None
            send_started = time.time()
            try:
                part_id = await self.waha.send_text(
                    session=message.session, chat_id=message.chat_id, text=parts[index],
                    reply_to=message.message_id if message.is_group and index == 0 else None)
            except WahaError as exc:
                await self._report_waha_failure(message.session, exc)
                if exc.maybe_delivered and await self._already_sent(claimed, part=parts[index], index=index,
                                                                    since=send_started - CLOCK_SKEW_SECONDS):
                    continue
                await self._record_failure(claimed, exc)
                return
            if index == parts_sent:
                await self._report(f"waha:{message.session}", CheckStatus.OK,
                                   f"sendText works for WAHA session '{message.session}'")
            sent_id = sent_id or part_id
            if index == len(parts) - 1:
                last_part_id = part_id  # finish() records the last part in the same step
                break
            if not await asyncio.to_thread(self.store.mark_part_sent, key, owner, parts_sent=index + 1,
                                           sent_message_id=part_id):
                log.warning("event=%s chat=%s lease lost after part %d; the new owner continues",
                            message.event_id, message.chat_id, index + 1)
                return
        await self._finish(claimed, outcome=outcome, sent_message_id=sent_id, history=history,
                           last_part_id=last_part_id)
        log.info("event=%s chat=%s decision=replied outcome=%s parts=%d chars=%d sent_id=%s total_ms=%.0f",
                 message.event_id, message.chat_id, outcome, len(parts), len(text), sent_id,
                 (loop.time() - started) * 1000)

    async def _report_waha_failure(self, session: str, exc: WahaError) -> None:
        if exc.status == 401:
            await self._report(f"waha:{session}", CheckStatus.FAILING,
                               "WAHA rejected WAHA_API_KEY (HTTP 401): set it to the key WAHA was started with")
        elif exc.status == 422:
            await self._report(f"waha:{session}", CheckStatus.DEGRADED,
                               f"WAHA session '{session}' is not WORKING (sendText answered HTTP 422)")
        else:
            await self._report(f"waha:{session}", CheckStatus.DEGRADED, f"sendText failed: {exc}")

    async def _compose(self, claimed: ClaimedMessage) -> ComposedReply | None:
        """The reply's text, its outcome and the turn to remember; None when this chat gets no reply now."""
        message, settings = claimed.message, self.settings
        command = settings.command_of(message.text)
        context = f"event={message.event_id} chat={message.chat_id}"
        if command in ("stop", "start"):
            paused = await asyncio.to_thread(self.store.set_opted_out, message.chat_key, command == "stop")
            log.info("%s decision=%s%s", context, "opted_out" if command == "stop" else "opted_in",
                     " (chat paused: no confirmation sent)" if paused else "")
            # While a person handles the chat, the bot stays silent even to confirm.
            return None if paused else ComposedReply(
                text=settings.stop_reply if command == "stop" else settings.start_reply, outcome="command")
        admission, history = await asyncio.to_thread(self._admit, message.chat_key, claimed.texts,
                                                     with_history=bool(claimed.texts) and command != "reset")
        if admission.verdict != "ok":
            log.info("%s decision=skipped reason=%s notice=%s", context, admission.verdict, admission.notice)
            if admission.verdict == "loop":
                log.warning("%s bot-to-bot loop suspected: chat paused for %.0f min", context,
                            settings.loop_pause_minutes)
            return ComposedReply(text=settings.rate_limit_reply, outcome="notice") if admission.notice else None
        if command == "reset":
            await asyncio.to_thread(self.store.clear_history, message.chat_key)
            log.info("%s decision=history_reset", context)
            return ComposedReply(text=settings.reset_reply, outcome="command")
        if not claimed.texts:
            return ComposedReply(text=settings.non_text_reply, outcome="non_text")
        user_turn = "\n".join(claimed.texts)
        reply = await self._ask_llm(message, user_turn, history, context)
        cost = (reply.cost_usd or 0.0) if reply is not None else 0.0
        formatted = markdown_to_whatsapp(reply.text) if reply is not None else ""
        if not formatted:  # nothing left after formatting (an LLM answering only '---') is no answer
            return ComposedReply(text=settings.fallback_message, outcome="fallback", llm_cost_usd=cost)
        # History keeps the LLM's own Markdown: fed WhatsApp marks, it would start writing them back.
        return ComposedReply(text=formatted, outcome="success", history=(user_turn, reply.text), llm_cost_usd=cost)

    def _admit(self, chat_key: str, texts: list[str], *,
               with_history: bool) -> tuple[Admission, list[tuple[str, str]]]:
        """The chat's admission and, if admitted, its recent turns: one trip to a store thread, two transactions
        (the history read stays outside the write lock, which every worker shares)."""
        settings = self.settings
        admission = self.store.admit(
            chat_key, texts=texts, per_minute=settings.rate_limit_per_minute, per_day=settings.daily_message_limit,
            loop_repeats=settings.loop_repeats, loop_window=settings.loop_window_seconds,
            loop_pause=settings.loop_pause_minutes * 60)
        if admission.verdict != "ok" or not with_history or not settings.history_turns:
            return admission, []
        turns = self.store.history(chat_key, since=time.time() - settings.history_ttl_minutes * 60,
                                   limit=settings.history_turns * 2)
        return admission, trim_history(turns, max_chars=settings.history_max_chars)

    async def _ask_llm(self, message: IncomingMessage, user_turn: str, history: list[tuple[str, str]],
                       context: str) -> LLMReply | None:
        # OpenRouter's abuse tracking wants a stable end-user id; a hash never reveals the number.
        user = hashlib.sha256(message.chat_id.encode("utf-8")).hexdigest()[:32]
        for attempt_history in (history, []):
            prompt = [{"role": "system", "content": self.settings.ai_system_prompt},
                      *({"role": role, "content": content} for role, content in attempt_history),
                      {"role": "user", "content": user_turn}]
            try:
                reply = await self.llm.complete(prompt, user=user, log_context=context)
            except LLMError as exc:
                if exc.status == 400 and "context" in str(exc).lower() and attempt_history:
                    log.warning("%s prompt too long for the model; retrying without history", context)
                    continue
                log.error("%s llm_failed=%s -> fallback", context, exc)
                await self._report_llm_failure(exc)
                return None
            log.info("%s llm_ok model=%s attempts=%d llm_ms=%.0f tokens=%s history_turns=%d", context, reply.model,
                     reply.attempts, reply.latency_seconds * 1000, reply.usage.get("total_tokens"),
                     len(attempt_history))
            await self._report_llm_success(reply, context)
            return reply
        return None

    async def _report_llm_success(self, reply: LLMReply, context: str) -> None:
        configured = reply.configured_model
        if not reply.from_fallback:
            await self._report("llm", CheckStatus.OK, f"replies come from OPENROUTER_MODEL={configured}")
            return
        why = "is not served" if configured in reply.unserved_models else "did not answer"
        await self._report("llm", CheckStatus.DEGRADED,
                           f"OPENROUTER_MODEL={configured} {why}; replies come from the fallback {reply.answered_by}")
        quiet = self._notices.due("fallback")
        if quiet is not None:
            log.warning("%s llm decision=fallback_model model=%s configured=%s: OPENROUTER_MODEL %s, so a fallback "
                        "model answered; check the id with `python whatsapp_webhook_server.py --check`%s", context,
                        reply.model, configured, why, f" ({quiet} more in the last minute)" if quiet else "")

    async def _report_llm_failure(self, exc: LLMError) -> None:
        if isinstance(exc, ModelUnavailableError):
            models = ", ".join(self.llm.models)
            await self._report("llm", CheckStatus.FAILING, f"no configured model is served ({models}): customers "
                               "get FALLBACK_MESSAGE; set OPENROUTER_MODEL to an id that --check lists")
        elif exc.status in (401, 402):
            what = "rejected OPENROUTER_API_KEY" if exc.status == 401 else "says the account is out of credits"
            await self._report("llm", CheckStatus.FAILING, f"the LLM server {what} (HTTP {exc.status}): customers "
                               "get FALLBACK_MESSAGE")
        elif exc.transient:
            await self._report("llm", CheckStatus.DEGRADED, f"the last reply fell back to FALLBACK_MESSAGE: {exc}")

    async def _type(self, message: IncomingMessage, part: str, *, since: float | None) -> None:
        """WAHA's anti-ban recipe before each part: typing for a human-looking time, then stop typing."""
        if not self.settings.typing_simulation:
            return
        loop = asyncio.get_running_loop()
        if since is None:  # a later part: typing starts now
            await self._quietly("startTyping", self.waha.start_typing(session=message.session,
                                                                      chat_id=message.chat_id))
            since = loop.time()
        remaining = typing_pause_seconds(part, rng=self.rng) - (loop.time() - since)
        if remaining > 0:
            await self.sleep(remaining)
        await self._quietly("stopTyping", self.waha.stop_typing(session=message.session, chat_id=message.chat_id))

    async def _record_failure(self, claimed: ClaimedMessage, exc: WahaError) -> None:
        message = claimed.message
        result = await asyncio.to_thread(
            self.store.record_failure, message.dedupe_key, claimed.lease_owner, str(exc),
            max_attempts=self.settings.reply_max_attempts,
            retry_in=retry_delay_seconds(claimed.attempts, base=self.settings.reply_retry_seconds))
        if result == "failed":
            MESSAGES_FAILED.labels("undelivered").inc(1 + len(claimed.merged))
        log.error("event=%s chat=%s decision=send_failed attempt=%d then=%s error=%s", message.event_id,
                  message.chat_id, claimed.attempts, result, exc)

    async def _finish(self, claimed: ClaimedMessage, *, outcome: str, sent_message_id: str | None,
                      history: tuple[str, str] | None = None, last_part_id: str | None = None) -> None:
        await asyncio.to_thread(self.store.finish, claimed.message.dedupe_key, claimed.lease_owner,
                                outcome=outcome, sent_message_id=sent_message_id, history=history,
                                last_part_id=last_part_id)
        count = 1 + len(claimed.merged)
        if outcome == "fallback":
            MESSAGES_FAILED.labels("llm").inc(count)
        elif outcome in ("skipped", "notice"):
            MESSAGES_SKIPPED.inc(count)
        else:
            MESSAGES_PROCESSED.inc(count)
        if outcome != "skipped":  # the histogram is about replies reaching WAHA
            PROCESSING_SECONDS.observe(max(0.0, time.time() - claimed.received_at))

    async def _already_sent(self, claimed: ClaimedMessage, *, part: str, index: int, since: float) -> bool:
        """A send was cut off (worker died, answer lost): ask WAHA whether the part left before resending it."""
        message = claimed.message
        try:
            candidates = await self.waha.find_sent_texts(session=message.session, chat_id=message.chat_id,
                                                         text=part, since=since)
            # The same words may have gone out for an earlier message (two voice notes, two fallbacks):
            # only a copy no other reply of ours accounts for can be this one.
            ids = [c.get("id") if isinstance(c.get("id"), str) else None for c in candidates]
            known = await asyncio.to_thread(self.store.known_sent_ids, [i for i in ids if i])
        except WahaError as exc:
            # Cannot tell: a possible second copy is better than a customer left without an answer.
            log.warning("event=%s chat=%s cannot check whether the interrupted send went out (%s); will send",
                        message.event_id, message.chat_id, exc)
            return False
        unaccounted = [i for i in ids if i is None or bare_message_id(i) not in known]
        if not unaccounted:
            return False
        sent_id = unaccounted[0]
        await asyncio.to_thread(self.store.mark_part_sent, message.dedupe_key, claimed.lease_owner,
                                parts_sent=index + 1, sent_message_id=sent_id)
        log.info("event=%s chat=%s decision=already_sent part=%d sent_id=%s (found in WAHA after an interrupted "
                 "send)", message.event_id, message.chat_id, index + 1, sent_id)
        return True

    async def _show_typing(self, message: IncomingMessage) -> None:
        await self._quietly("sendSeen", self.waha.send_seen(
            session=message.session, chat_id=message.chat_id, message_id=message.message_id,
            participant=message.participant if message.is_group else None))
        await self._quietly("startTyping", self.waha.start_typing(session=message.session, chat_id=message.chat_id))

    async def _quietly(self, what: str, call: Awaitable[None]) -> None:
        """Presence calls are cosmetic: their failure or slowness must never cost the customer the reply."""
        try:
            async with asyncio.timeout(PRESENCE_TIMEOUT_SECONDS):
                await call
        except (WahaError, TimeoutError) as exc:
            log.warning("%s failed (ignored): %s", what, exc or "timed out")


# ---------------------------------------------------------------------------
# Per-worker dispatcher: takes due messages from the inbox and runs the pipeline
# ---------------------------------------------------------------------------

class Dispatcher:
    """Runs on the worker's event loop: claims due messages, keeps their leases alive, recovers abandoned ones.

    Any worker may finish any message: the one that received it is woken at once,
    and every worker also polls, which is how messages of a killed worker (lease ran
    out) or of a stopped server are finished.
    """

    def __init__(self, *, store: StateStore, pipeline: ReplyPipeline, settings: Settings,
                 poll_seconds: float = 1.0, prune_every_seconds: float = 300.0) -> None:
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.prune_every_seconds = prune_every_seconds
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self._tasks: dict[asyncio.Task[None], str] = {}  # reply in progress -> its message's key
        self._wake = asyncio.Event()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._leases: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[str], None]] = []

    def start(self) -> None:
        """Call on the loop."""
        loop = asyncio.get_running_loop()
        self._main = loop.create_task(self._run(), name="dispatcher")
        self._leases = loop.create_task(self._keep_leases(), name="leases")

    def wake(self) -> None:
        """Call on the loop."""
        self._wake.set()

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(key)` is called (on the loop) whenever an attempt on a message ends."""
        self._listeners.append(listener)

    async def _run(self) -> None:
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim_due()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + self.prune_every_seconds
                    await self._prune()
            except StoreUnavailable as exc:
                log.error("dispatcher cannot read the inbox: %s", exc)
            except Exception:
                log.exception("dispatcher loop error")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass

    async def _claim_due(self) -> None:
        while not self._stopping and (room := self.settings.max_replies_in_flight - len(self._tasks)) > 0:
            batch = await asyncio.to_thread(self.store.claim_due, self.owner, limit=min(room, CLAIM_BATCH),
                                            lease_seconds=self.settings.lease_seconds,
                                            debounce_seconds=self.settings.debounce_seconds,
                                            mergeable=self._mergeable)
            for claimed in batch:
                self._start(claimed)
            if len(batch) < min(room, CLAIM_BATCH):
                return

    def _start(self, claimed: ClaimedMessage) -> None:
        if claimed.attempts > 1 or claimed.previous_status == "sending":
            log.info("event=%s chat=%s decision=retry attempt=%d previous=%s", claimed.message.event_id,
                     claimed.message.chat_id, claimed.attempts, claimed.previous_status)
        task = asyncio.get_running_loop().create_task(self._process(claimed))
        self._tasks[task] = claimed.message.dedupe_key

    async def _process(self, claimed: ClaimedMessage) -> None:
        key = claimed.message.dedupe_key
        REPLIES_IN_FLIGHT.inc()
        try:
            await self.pipeline.process(claimed)
        except Exception:
            pass  # logged by the pipeline; the message is back in the inbox
        finally:
            REPLIES_IN_FLIGHT.dec()
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            for listener in self._listeners:
                listener(key)
            self._wake.set()  # the chat's next message may be due now

    async def _keep_leases(self) -> None:
        """Every third of LEASE_SECONDS, one write extends the leases of all replies in progress here."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            keys = list(self._tasks.values())
            try:
                await asyncio.to_thread(self.store.renew_leases, keys, self.owner,
                                        lease_seconds=self.settings.lease_seconds)
            except StoreUnavailable as exc:
                log.warning("could not renew the leases of %d replies in progress: %s", len(keys), exc)
            except Exception:  # this task keeps every reply of the worker its own: it must not end
                log.exception("could not renew the leases of %d replies in progress", len(keys))

    def _mergeable(self, message: IncomingMessage) -> bool:
        """Text that may share one reply with the messages around it; commands and media stand alone."""
        return message.text is not None and self.settings.command_of(message.text) is None

    async def _prune(self) -> None:
        now = time.time()
        removed = await asyncio.to_thread(self.store.prune, older_than=now - self.settings.state_retention_hours * 3600,
                                          history_older_than=now - self.settings.history_ttl_minutes * 60)
        if removed:
            log.info("pruned %d finished messages older than %.0f h", removed, self.settings.state_retention_hours)

    async def stop(self, *, timeout: float) -> None:
        """Finish in-flight replies for up to `timeout` seconds; hand the rest back to the inbox."""
        self._stopping = True
        self._wake.set()
        try:
            if self._main is not None:
                await self._main
            pending = set(self._tasks)
            if pending:
                log.info("shutdown: waiting up to %.0fs for %d replies in flight", timeout, len(pending))
                _, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("shutdown: %d unfinished replies handed back to the inbox", len(pending))
        finally:
            if self._leases is not None:  # kept renewing while the replies above drained
                self._leases.cancel()
                await asyncio.gather(self._leases, return_exceptions=True)


# ---------------------------------------------------------------------------
# Per-process runtime: one event loop thread, one HTTP client per upstream, the dispatcher
# ---------------------------------------------------------------------------

class BackgroundLoop:
    """An asyncio loop in a daemon thread; Flask's threads hand it coroutines."""

    def __init__(self, *, name: str = "reply-loop") -> None:
        self.loop = asyncio.new_event_loop()
        # Store calls run in threads (asyncio.to_thread); the default pool (CPUs + 4) queues them under load.
        self.loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                                             thread_name_prefix="store"))
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, callback: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def stop(self, *, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


class CompletionBoard:
    """Lets a webhook thread sleep until its message's attempt ends, instead of polling tightly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, tuple[threading.Event, int]] = {}

    def watch(self, key: str) -> threading.Event:
        with self._lock:
            event, watchers = self._events.get(key, (threading.Event(), 0))
            self._events[key] = (event, watchers + 1)
            return event

    def unwatch(self, key: str) -> None:
        with self._lock:
            event, watchers = self._events[key]
            if watchers <= 1:
                del self._events[key]
            else:
                self._events[key] = (event, watchers - 1)

    def notify(self, key: str) -> None:
        with self._lock:
            entry = self._events.get(key)
        if entry is not None:
            entry[0].set()


class WorkerRuntime:
    """Everything that must exist once per worker process and never cross a fork."""

    def __init__(self, *, settings: Settings, store: StateStore, health: HealthReporter,
                 llm_transport: httpx.AsyncBaseTransport | None = None,
                 waha_transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.pid = os.getpid()
        self.background = BackgroundLoop()
        # One LLM connection per reply in flight: the LLM call is where replies spend their time.
        self.llm_http = upstream_client(
            transport=llm_transport, max_connections=settings.max_replies_in_flight,
            timeout=httpx.Timeout(connect=5.0, read=settings.llm_attempt_timeout_seconds, write=10.0,
                                  pool=settings.llm_attempt_timeout_seconds))
        self.waha_http = upstream_client(
            transport=waha_transport, max_connections=WAHA_MAX_CONNECTIONS,
            timeout=httpx.Timeout(connect=5.0, read=settings.waha_timeout_seconds, write=10.0,
                                  pool=settings.waha_timeout_seconds))
        llm = LLMClient(
            http=self.llm_http, base_url=settings.openrouter_base_url, api_key=settings.openrouter_api_key,
            model=settings.openrouter_model, fallback_models=settings.openrouter_fallback_models,
            openrouter=settings.uses_openrouter, reasoning_effort=settings.llm_reasoning_effort,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature, attempt_timeout=settings.llm_attempt_timeout_seconds,
            deadline=settings.llm_deadline_seconds, max_attempts=settings.llm_max_attempts,
            app_title=SERVICE_NAME if settings.uses_openrouter else None, sleep=sleep)
        waha = WahaClient(http=self.waha_http, base_url=settings.waha_base_url, api_key=settings.waha_api_key,
                          send_attempts=settings.waha_send_attempts, sleep=sleep)
        pipeline = ReplyPipeline(settings=settings, store=store, llm=llm, waha=waha, health=health, sleep=sleep)
        self.completions = CompletionBoard()
        self.dispatcher = Dispatcher(store=store, pipeline=pipeline, settings=settings)
        self.dispatcher.add_listener(self.completions.notify)
        self.background.call(self.dispatcher.start)

    def wake_dispatcher(self) -> None:
        self.background.call(self.dispatcher.wake)

    def close(self, *, drain_seconds: float = 10.0) -> None:
        async def stop() -> None:
            await self.dispatcher.stop(timeout=drain_seconds)
            await self.llm_http.aclose()
            await self.waha_http.aclose()

        try:
            self.background.submit(stop()).result(drain_seconds + 5)
        except Exception as exc:  # closing must never stop a worker from exiting
            log.warning("worker shutdown was not clean: %r", exc)
        self.background.stop()


# ---------------------------------------------------------------------------
# The webhook service (pure core) and the Flask app (thin adapter)
# ---------------------------------------------------------------------------

def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class WebhookService:
    """Turns one webhook request (raw bytes + headers) into a JSON answer and a status code."""

    def __init__(self, *, settings: Settings, store: StateStore, started_at: float,
                 runtime_factory: Callable[[], WorkerRuntime], health: HealthReporter | None = None,
                 poll_seconds: float = 0.25) -> None:
        self.settings = settings
        self.store = store
        self.health = health or HealthReporter(store=store)
        self.started_at = started_at
        self._store_health = (CheckStatus.OK, started_at)  # this worker's view: the store cannot report itself
        self.poll_seconds = poll_seconds
        self._runtime_factory = runtime_factory
        self._runtime: WorkerRuntime | None = None
        self._runtime_lock = threading.Lock()
        # Waiting requests hold gunicorn threads; past this many, answer 202 at once so new
        # deliveries are still recorded promptly (the inbox makes 202 as safe as 200).
        self._waiting_slots = threading.BoundedSemaphore(settings.webhook_max_waiting) \
            if settings.webhook_max_waiting else None
        self._shutting_down = threading.Event()

    def begin_shutdown(self) -> None:
        """SIGTERM: stop holding webhook requests (their messages are recorded) so gunicorn can move on."""
        self._shutting_down.set()

    def runtime(self) -> WorkerRuntime:
        """The worker's runtime, built on first use (or by gunicorn's post_worker_init), always after the fork."""
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._runtime_lock:
            if self._runtime is None or self._runtime.pid != os.getpid():
                self._runtime = self._runtime_factory()
            return self._runtime

    def close(self, *, drain_seconds: float = 10.0) -> None:
        with self._runtime_lock:
            if self._runtime is not None and self._runtime.pid == os.getpid():
                self._runtime.close(drain_seconds=drain_seconds)
            self._runtime = None
        self.store.close()

    def handle_webhook(self, body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], int]:
        request_id = headers.get("X-Webhook-Request-Id", "-")
        rejection = self._check_sender(body, headers)
        if rejection is not None:
            log.warning("request=%s rejected status=401 reason=%s", request_id, rejection)
            REQUESTS_REJECTED.labels("401").inc()
            self.count_quietly("requests_unauthorized")
            return {"error": rejection}, 401
        try:
            if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                raise BadRequestError("Content-Type must be application/json", status=415)
            event = parse_event(body)
            decision = classify_event(event, reply_in_groups=self.settings.reply_in_groups)
        except BadRequestError as exc:
            log.warning("request=%s rejected status=%d error=%s", request_id, exc.status, exc.message)
            REQUESTS_REJECTED.labels(str(exc.status)).inc()
            self.count_quietly("requests_rejected")
            return {"error": exc.message}, exc.status

        if isinstance(decision, SessionStatus):
            check, reason = decision.check
            self.health.report(f"waha:{decision.session}", check, reason)
            return self._ignore(decision.event_id, None, Ignored("session_status", f"recorded for /health: {reason}"))
        if isinstance(decision, Ignored):
            return self._ignore(event.event_id, self._chat_of(event), decision)
        try:
            if isinstance(decision, OwnMessage):
                return self._ignore(decision.event_id, decision.chat_id, self._notice_own_message(decision))
            if decision.is_group and not self._addressed_in_group(decision):
                return self._ignore(decision.event_id, decision.chat_id, Ignored(
                    "group_not_addressed", "in groups the bot answers only when mentioned or replied to"))
        except StoreUnavailable as exc:
            log.error("event=%s store unavailable: %s", decision.event_id, exc)
            return {"error": "state store unavailable; please redeliver"}, 503
        message = decision
        try:
            accepted = self.store.accept(message)
        except StoreUnavailable as exc:
            # Never 2xx for a message we could not write down: WAHA redelivers 5xx.
            log.error("event=%s chat=%s store unavailable, asking WAHA to redeliver: %s",
                      message.event_id, message.chat_id, exc)
            return {"error": "state store unavailable; message not recorded, please redeliver"}, 503
        if not accepted.stored:
            detail = {"done": "message already answered", "failed": "message already given up on"}.get(
                accepted.status, "message is being answered")
            return self._ignore(message.event_id, message.chat_id, Ignored("duplicate", detail))

        if accepted.attempts == 0:
            MESSAGES_RECEIVED.inc()
        log.info("event=%s chat=%s engine=%s decision=reply key=%s text_chars=%d", message.event_id,
                 message.chat_id, message.engine, message.dedupe_key, len(message.text or ""))
        return self._await_reply(message, attempts_before=accepted.attempts)

    def _await_reply(self, message: IncomingMessage, *, attempts_before: int) -> tuple[dict[str, Any], int]:
        """Wait up to WEBHOOK_SYNC_WAIT_SECONDS for this message's attempt to end (the inbox already has it)."""
        key = message.dedupe_key
        try:
            runtime = self.runtime()
            runtime.wake_dispatcher()
        except Exception:
            log.exception("event=%s reply runtime unavailable; the message waits in the inbox", message.event_id)
            return self._accepted(message)
        if self._waiting_slots is None or not self._waiting_slots.acquire(blocking=False):
            return self._accepted(message)
        ended = runtime.completions.watch(key)
        deadline = time.monotonic() + self.settings.webhook_sync_wait_seconds
        try:
            while True:
                entry = self.store.entry(key)
                if entry is not None and (entry.status in ("done", "failed") or (
                        entry.status == "queued" and entry.attempts > attempts_before and entry.last_error)):
                    return self._outcome(message, entry)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._shutting_down.is_set():
                    return self._accepted(message)
                # Woken at once when this worker ends the attempt; polling covers the other workers.
                ended.wait(min(remaining, self.poll_seconds))
                ended.clear()
        except StoreUnavailable:
            return self._accepted(message)  # the message is recorded; a worker will finish it
        finally:
            runtime.completions.unwatch(key)
            self._waiting_slots.release()

    def _notice_own_message(self, own: OwnMessage) -> Ignored:
        """Our echo is ignored; a person writing from this account pauses the bot there (human handoff)."""
        settings = self.settings
        if self.store.is_our_message(own.chat_key, message_id=own.message_id, text=own.text, within=600):
            return Ignored("from_me", "the bot's own reply")
        said = " ".join((own.text or "").lower().split())
        if said == " ".join(settings.bot_resume_command.lower().split()):
            self.store.pause_chat(own.chat_key, until=0, reason="operator")
            log.info("event=%s chat=%s decision=bot_resumed (operator command)", own.event_id, own.chat_id)
            return Ignored("from_me", "operator command: bot resumed in this chat")
        if said == " ".join(settings.bot_pause_command.lower().split()):
            self.store.pause_chat(own.chat_key, until=PAUSED_FOREVER, reason="operator")
            log.info("event=%s chat=%s decision=bot_paused reason=operator until=resume command",
                     own.event_id, own.chat_id)
            return Ignored("from_me", "operator command: bot paused in this chat until resumed")
        if not settings.handoff_pause_minutes:
            return Ignored("from_me", "message sent by a person from this account")
        until = time.time() + settings.handoff_pause_minutes * 60
        self.store.pause_chat(own.chat_key, until=until, reason="handoff")
        log.info("event=%s chat=%s decision=bot_paused reason=handoff minutes=%.0f", own.event_id, own.chat_id,
                 settings.handoff_pause_minutes)
        return Ignored("from_me", f"a person answered: bot paused in this chat for "
                                  f"{settings.handoff_pause_minutes:g} min")

    def _addressed_in_group(self, message: IncomingMessage) -> bool:
        return message.mentions_bot or bool(message.reply_to_id and self.store.is_our_message(
            message.chat_key, message_id=message.reply_to_id, text=None, within=float("inf")))

    def _accepted(self, message: IncomingMessage) -> tuple[dict[str, Any], int]:
        log.info("event=%s chat=%s decision=accepted (reply continues in background)",
                 message.event_id, message.chat_id)
        return {"status": "accepted", "message_key": message.dedupe_key,
                "detail": "message recorded; the reply will be sent", "timestamp": utc_now_iso()}, 202

    @staticmethod
    def _outcome(message: IncomingMessage, entry: InboxEntry) -> tuple[dict[str, Any], int]:
        if entry.status == "done":
            return {"status": "processed",
                    "result": {"status": entry.outcome, "from_number": message.chat_id,
                               "response_sent": entry.outcome != "skipped", "message_id": entry.sent_message_id},
                    "timestamp": utc_now_iso()}, 200
        if entry.status == "failed":
            # Redelivering would not help any more: say so with 200 so WAHA stops.
            return {"status": "failed", "result": {"status": "failed", "from_number": message.chat_id,
                                                   "response_sent": False, "message_id": None},
                    "error": "the reply could not be delivered after every attempt", "timestamp": utc_now_iso()}, 200
        # WAHA's own error text stays in our log: it can carry stack traces.
        return {"error": "the reply could not be sent yet; please redeliver"}, 503

    def _check_sender(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        token = self.settings.webhook_secret_token
        if token and not verify_token(headers.get("X-Webhook-Token"), token):
            return "missing or invalid X-Webhook-Token header"
        key = self.settings.webhook_hmac_key
        if key and not verify_waha_hmac(body, headers.get("X-Webhook-Hmac"), key,
                                        algorithm=headers.get("X-Webhook-Hmac-Algorithm")):
            return "missing or invalid X-Webhook-Hmac signature"
        return None

    def _ignore(self, event_id: str | None, chat_id: str | None, ignored: Ignored) -> tuple[dict[str, Any], int]:
        log.info("event=%s chat=%s decision=ignored reason=%s", event_id, chat_id, ignored.reason)
        MESSAGES_IGNORED.labels(ignored.reason).inc()
        self.count_quietly(IGNORED_COUNTER_PREFIX + ignored.reason)
        return {"status": "ignored", "reason": ignored.reason, "detail": ignored.detail}, 200

    @staticmethod
    def _chat_of(event: WebhookEvent) -> str | None:
        chat = (event.payload or {}).get("from")
        return chat if isinstance(chat, str) else None

    def count_quietly(self, name: str) -> None:
        """Counting ignored or rejected requests is best effort: a store hiccup must not turn them into errors."""
        try:
            self.store.count(name)
        except StoreUnavailable as exc:
            log.warning("could not count %s: %s", name, exc)

    def health_document(self) -> tuple[dict[str, Any], int]:
        """/health: one status for the whole server, the same from every worker, and the checks behind it."""
        checks = self.health_checks()
        status = overall_health(checks)
        shown = {name: check.to_json() for name, check in checks.items()}
        if status is ServerHealth.UNHEALTHY:
            return {"status": str(status), "service": SERVICE_NAME, "version": __version__, "checks": shown,
                    "error": "state store unavailable", "timestamp": utc_now_iso()}, 503
        return self.status_document(str(status), checks=shown), 200

    def health_checks(self) -> dict[str, HealthCheck]:
        """store (a real write, now), llm and waha (what the workers reported, from the shared store)."""
        try:
            self.store.ping()
            store = self._store_check(CheckStatus.OK, "the state store takes writes")
            reports = self.store.health_reports()
        except StoreUnavailable as exc:
            log.error("health check failed: %s", exc)
            store = self._store_check(CheckStatus.FAILING, "the state store cannot take writes: new messages get "
                                                           "503 so WAHA redelivers them (see the server log)")
            reports = self.health.last_known()
        checks = {"store": store}
        for part in HEALTH_CHECKS[1:]:
            checks[part] = combine_checks(report for name, report in reports.items()
                                          if name == part or name.startswith(part + ":")) or HealthCheck(
                status=CheckStatus.OK, reason=f"no {part.upper()} problem reported since the server started",
                since=self.started_at)
        return checks

    def _store_check(self, status: CheckStatus, reason: str) -> HealthCheck:
        if self._store_health[0] is not status:
            self._store_health = (status, time.time())
        return HealthCheck(status=status, reason=reason, since=self._store_health[1])

    def status_document(self, status: str, *, service: str = SERVICE_NAME,
                        checks: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON shared by /health, /stats and GET on the webhook."""
        snapshot = self.store.snapshot()
        counters: dict[str, int] = snapshot["counters"]
        by_status: dict[str, int] = snapshot["by_status"]
        ignored = {name[len(IGNORED_COUNTER_PREFIX):]: value for name, value in sorted(counters.items())
                   if name.startswith(IGNORED_COUNTER_PREFIX)}
        return {
            "status": status,
            "service": service,
            "version": __version__,
            **({"checks": checks} if checks is not None else {}),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "worker_pid": os.getpid(),
            "stats": {
                "messages_received": counters.get("messages_received", 0),
                "messages_processed": counters.get("messages_processed", 0),
                "messages_failed": counters.get("messages_failed", 0),
                "messages_skipped": counters.get("messages_skipped", 0),
                "messages_in_progress": sum(by_status.values()),
                "messages_queued": by_status.get("queued", 0),
                "messages_retrying": snapshot["retrying"],
                "messages_undelivered": counters.get("messages_undelivered", 0),
                "chats_paused": snapshot["paused"],
                "chats_opted_out": snapshot["opted_out"],
                "messages_ignored": sum(ignored.values()),
                "ignored_by_reason": ignored,
                "requests_rejected": counters.get("requests_rejected", 0),
                "requests_unauthorized": counters.get("requests_unauthorized", 0),
                "llm_cost_usd": round(counters.get(LLM_COST_COUNTER, 0) / 1e9, 6),
                "server_started_at": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds"),
            },
            "timestamp": utc_now_iso(),
        }


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; the message's key=value pairs (event, chat, decision...) become fields."""

    FIELD = re.compile(r"(\w+)=(\S+)")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "pid": record.process, "logger": record.name, "message": message}
        for name, value in self.FIELD.findall(message):
            document.setdefault(name, value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class SharedRotatingFileHandler(logging.handlers.WatchedFileHandler):
    """Size-based rotation that is safe with several gunicorn workers writing one file.

    The process that finds the file too big rotates it under an exclusive lock; the
    others notice the new inode (WatchedFileHandler) and reopen instead of rotating again.
    """

    def __init__(self, filename: str, *, max_bytes: int, backup_count: int) -> None:
        super().__init__(filename, encoding="utf-8")
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.lock_path = self.baseFilename + ".lock"

    def emit(self, record: logging.LogRecord) -> None:
        if self.max_bytes and self.stream is not None and self.stream.tell() >= self.max_bytes:
            self._rotate()
        super().emit(record)

    def _rotate(self) -> None:
        import fcntl

        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(self.baseFilename)
                if current.st_size >= self.max_bytes:  # nobody rotated it while we waited
                    for index in range(self.backup_count - 1, 0, -1):
                        older = f"{self.baseFilename}.{index}"
                        if os.path.exists(older):
                            os.replace(older, f"{self.baseFilename}.{index + 1}")
                    os.replace(self.baseFilename, f"{self.baseFilename}.1")
            except FileNotFoundError:
                pass
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.reopenIfNeeded()


def configure_logging(settings: Settings) -> None:
    """Console plus LOG_FILE, text or JSON lines; safe to call again (handlers are replaced, not stacked)."""
    formatter: logging.Formatter = JsonLogFormatter() if settings.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file:
        try:
            handlers.append(SharedRotatingFileHandler(settings.log_file, max_bytes=settings.log_max_bytes,
                                                      backup_count=settings.log_backup_count))
        except OSError as exc:
            raise SettingsError(f"LOG_FILE {settings.log_file!r} cannot be opened ({exc}); "
                                "point LOG_FILE at a writable path or set it empty to log to the console only") from None
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(settings.log_level)
    log.propagate = False


def create_app(settings: Settings | None = None, *, store: StateStore | None = None,
               llm_transport: httpx.AsyncBaseTransport | None = None,
               waha_transport: httpx.AsyncBaseTransport | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> Flask:
    """Build the Flask app. Opens no client, thread or loop: those are made per worker on first use.

    The keyword arguments are seams for tests: a store, httpx transports for the
    upstreams and the coroutine used for every wait (backoff, typing pause).
    """
    settings = settings or load_settings()
    configure_logging(settings)
    store = store or StateStore(settings.state_db)
    store.initialize()
    if not (settings.webhook_secret_token or settings.webhook_hmac_key):
        log.warning("neither WEBHOOK_HMAC_KEY nor WEBHOOK_SECRET_TOKEN is set: anyone who can reach this port "
                    "can make the bot send WhatsApp messages; set WEBHOOK_HMAC_KEY to WAHA's HMAC key")
    # gunicorn.conf.py records the master's start so every worker reports the same uptime.
    started_at = float(os.environ.get("WEBHOOK_SERVER_STARTED_AT") or time.time())
    reporter = HealthReporter(store=store)
    service = WebhookService(
        settings=settings, store=store, started_at=started_at, health=reporter,
        runtime_factory=lambda: WorkerRuntime(settings=settings, store=store, health=reporter,
                                              llm_transport=llm_transport, waha_transport=waha_transport,
                                              sleep=sleep))

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = service

    @app.post(WEBHOOK_PATH)
    def receive_webhook() -> Any:
        body, status = service.handle_webhook(request.get_data(cache=True), request.headers)
        return jsonify(body), status

    @app.get(WEBHOOK_PATH)
    def describe_webhook() -> Any:
        document = service.status_document("ok", service=WEBHOOK_SERVICE_NAME)
        document["endpoint"] = WEBHOOK_PATH
        document["accepts"] = "POST application/json (WAHA webhook events: message, message.any)"
        return jsonify(document)

    @app.get("/health")
    def health() -> Any:
        document, status = service.health_document()
        return jsonify(document), status

    @app.get("/stats")
    def stats() -> Any:
        return jsonify(service.status_document("ok"))

    @app.get("/metrics")
    def metrics() -> Any:
        body, content_type = metrics_document()
        return Response(body, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if exc.code == 413:
            log.warning("request rejected status=413 (body over MAX_BODY_BYTES=%d)", settings.max_body_bytes)
            service.count_quietly("requests_rejected")
            REQUESTS_REJECTED.labels("413").inc()
            _discard_unread_body(limit=8 * settings.max_body_bytes)
            return jsonify({"error": f"request body is larger than {settings.max_body_bytes} bytes"}), 413
        return jsonify({"error": exc.description or exc.name}), exc.code

    @app.errorhandler(StoreUnavailable)
    def store_error(exc: StoreUnavailable) -> Any:
        log.error("state store unavailable: %s", exc)
        return jsonify({"error": "state store unavailable; retry later"}), 503

    return app


def _discard_unread_body(*, limit: int) -> None:
    """Read away a rejected body so the sender's keep-alive connection stays usable.

    gunicorn drains only 64 KiB of an unread body and then drops the connection
    without saying so; WAHA's next event on that connection would fail. Bodies over
    `limit` are not read: closing the connection is then the cheaper answer.
    """
    remaining = request.content_length or 0
    stream = request.environ.get("wsgi.input")
    if stream is None or not 0 < remaining <= limit:
        return
    while remaining > 0:
        chunk = stream.read(min(65536, remaining))
        if not chunk:
            break
        remaining -= len(chunk)


def check_local_resources(settings: Settings) -> None:
    """Open LOG_FILE and STATE_DB once, so a bad path stops start-up with a SettingsError that names it."""
    configure_logging(settings)
    store = StateStore(settings.state_db)
    store.initialize()
    store.close()


def recover_after_restart(settings: Settings) -> int:
    """Called once per server start, before workers exist: unfinished messages become due at once.

    Their leases belong to processes of the previous run, so nobody is working on them.
    """
    store = StateStore(settings.state_db)
    store.initialize()
    try:
        recovered = store.expire_leases()
    finally:
        store.close()  # no connection may cross gunicorn's fork
    if recovered:
        log.warning("recovering %d messages left unfinished by the previous run", recovered)
    return recovered


def start_worker(app: Flask | None = None) -> None:
    """Start this worker's loop and dispatcher now (gunicorn's post_worker_init), so recovery needs no traffic."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].runtime()


def begin_shutdown(app: Flask | None = None) -> None:
    """Called on SIGTERM (gunicorn.conf.py chains it to gunicorn's handler)."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].begin_shutdown()


def shutdown(app: Flask | None = None, *, drain_seconds: float = 10.0) -> None:
    """Finish or hand back in-flight replies, then release the loop, clients and database (worker_exit)."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].close(drain_seconds=drain_seconds)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

_app: Flask | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """`whatsapp_webhook_server:app` for gunicorn, built on first access so importing the module stays cheap."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        if _app is None:
            try:
                _app = create_app()
            except SettingsError as exc:
                print(f"whatsapp_webhook_server: {exc}", file=sys.stderr, flush=True)
                raise
        return _app


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return text if self.ok or not self.hint else f"{text}\n     fix: {self.hint}"


def check_deployment(settings: Settings, *, transport: httpx.BaseTransport | None = None) -> list[CheckResult]:
    """Talk to WAHA and the LLM once, the way the server will, and say what is wrong and how to fix it."""
    results: list[CheckResult] = []
    with httpx.Client(transport=transport, timeout=10.0) as http:
        def get(url: str, **headers: str) -> httpx.Response | str:
            try:
                return http.get(url, headers=headers)
            except httpx.HTTPError as exc:
                return f"cannot reach {url} ({type(exc).__name__})"

        ping = get(f"{settings.waha_base_url}/ping")
        if isinstance(ping, str) or ping.status_code != 200:
            results.append(CheckResult("WAHA reachable", False, ping if isinstance(ping, str) else
                                       f"GET /ping answered HTTP {ping.status_code}",
                                       "start WAHA or point WAHA_BASE_URL at it (default port 3000)"))
        else:
            results.append(CheckResult("WAHA reachable", True, f"{settings.waha_base_url}/ping answered pong"))
            sessions = get(f"{settings.waha_base_url}/api/sessions?all=true", **{"X-Api-Key": settings.waha_api_key})
            if isinstance(sessions, str) or sessions.status_code != 200:
                status = sessions if isinstance(sessions, str) else f"HTTP {sessions.status_code}"
                results.append(CheckResult("WAHA API key and sessions", False, f"GET /api/sessions: {status}",
                                           "WAHA_API_KEY must equal the WAHA_API_KEY WAHA was started with"
                                           if not isinstance(sessions, str) and sessions.status_code == 401 else ""))
            else:
                listed = [(str(x.get("name")), str(x.get("status"))) for x in sessions.json() if isinstance(x, dict)]
                working = [name for name, status in listed if status == "WORKING"]
                detail = ", ".join(f"{name}={status}" for name, status in listed) or "no sessions"
                results.append(CheckResult("WAHA session WORKING", bool(working), detail,
                                           "start a session and pair it: WAHA dashboard (/dashboard) or "
                                           "GET /api/{session}/auth/qr, then scan the QR code with WhatsApp"))

        auth = {"Authorization": f"Bearer {settings.openrouter_api_key}"} if settings.openrouter_api_key else {}
        base = settings.openrouter_base_url
        if settings.uses_openrouter:  # its /models is public: only /key says whether the key works
            key = get(f"{base}/key", **auth)
            if isinstance(key, str):
                results.append(CheckResult("OpenRouter key", False, key, "check the network path to openrouter.ai"))
            elif key.status_code in (401, 403):
                results.append(CheckResult("OpenRouter key", False, f"the key was rejected (GET /key answered HTTP "
                                           f"{key.status_code})", "create a key at https://openrouter.ai/keys and "
                                           "set OPENROUTER_API_KEY"))
            elif key.status_code != 200:
                results.append(CheckResult("OpenRouter key", False, f"GET /key answered HTTP {key.status_code}"))
            else:
                data = _json_or_none(key)
                data = data.get("data", {}) if isinstance(data, dict) else {}
                results.append(CheckResult("OpenRouter key", True, f"valid (limit_remaining="
                                           f"{data.get('limit_remaining')}, free tier={data.get('is_free_tier')})"))
        models = get(f"{base}/models", **auth)
        if isinstance(models, str):
            results.append(CheckResult("LLM reachable", False, models,
                                       "check OPENROUTER_BASE_URL (an OpenAI-compatible base URL ending in /v1)"))
        elif models.status_code in (401, 403):
            results.append(CheckResult("LLM key", False, f"{base}/models rejected the key (HTTP {models.status_code})",
                                       "set OPENROUTER_API_KEY to a key this server accepts"))
        elif models.status_code != 200 or (listed := listed_models(models)) is None:
            results.append(CheckResult("LLM reachable", False, f"GET {base}/models answered HTTP {models.status_code}"
                                       f"{'' if models.status_code != 200 else ' without a model list'}",
                                       "check OPENROUTER_BASE_URL (an OpenAI-compatible base URL ending in /v1)"))
        else:
            settings_of = [("OPENROUTER_MODEL", settings.openrouter_model),
                           *(("OPENROUTER_FALLBACK_MODELS", m) for m in settings.openrouter_fallback_models)]
            for setting, model in settings_of:
                name = f"LLM model {setting}"
                if model in listed:
                    kinds = listed[model]
                    results.append(CheckResult(name, True, f"{model} is served"
                                               + (f" (input: {', '.join(kinds)})" if kinds else "")))
                    continue
                suggestions = suggest_models(model, list(listed))
                results.append(CheckResult(
                    name, False, f"{model} is not among the {len(listed)} models {base}/models lists",
                    f"set {setting} to a listed id" + (f", e.g. {' or '.join(suggestions)}" if suggestions else "")))
            if not settings.uses_openrouter and settings.openrouter_model in listed:
                results.append(_check_test_completion(http, settings, auth))
    return results


def _check_test_completion(http: httpx.Client, settings: Settings, auth: Mapping[str, str]) -> CheckResult:
    """A one-token request: on servers other than OpenRouter only this shows whether the key is accepted
    (their /models is often open to anyone)."""
    url = f"{settings.openrouter_base_url}/chat/completions"
    body = {"model": settings.openrouter_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    try:
        response = http.post(url, json=body, headers=auth, timeout=settings.llm_attempt_timeout_seconds)
    except httpx.HTTPError as exc:
        return CheckResult("LLM answers", False, f"cannot reach {url} ({type(exc).__name__})")
    if response.status_code in (401, 403):
        return CheckResult("LLM key", False, f"{url} rejected the key (HTTP {response.status_code})",
                           "set OPENROUTER_API_KEY to a key this server accepts")
    if response.status_code != 200:
        return CheckResult("LLM answers", False, f"a one-token test request answered HTTP {response.status_code}: "
                           f"{_error_message(response)}")
    return CheckResult("LLM answers", True, f"{settings.openrouter_model} answered a one-token test request")


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def listed_models(response: httpx.Response) -> dict[str, tuple[str, ...]] | None:
    """GET /models as {id: input modalities}; None when the answer is not an OpenAI-style model list."""
    document = _json_or_none(response)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    listed: dict[str, tuple[str, ...]] = {}
    for entry in data:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            architecture = entry.get("architecture") if isinstance(entry.get("architecture"), dict) else {}
            kinds = architecture.get("input_modalities")
            listed[entry["id"]] = tuple(k for k in kinds if isinstance(k, str)) if isinstance(kinds, list) else ()
    return listed


def suggest_models(missing: str, listed: list[str], *, count: int = 3) -> list[str]:
    """Ids from the server's own list that look like the missing one (never a hard-coded id: those retire)."""
    close = difflib.get_close_matches(missing, listed, n=count, cutoff=0.6)
    if close:
        return close
    vendor = missing.split("/")[0] + "/" if "/" in missing else ""
    same_vendor = sorted(m for m in listed if vendor and m.startswith(vendor))
    return difflib.get_close_matches(missing, same_vendor, n=count, cutoff=0.0) if same_vendor else []


def main(argv: list[str] | None = None) -> int:
    """Run Flask's development server (production uses gunicorn; see start_webhook_server.sh).

    --check-settings validates the configuration; --check also talks to WAHA and the LLM.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
        check_local_resources(settings)
        if "--check-settings" in args or "--check" in args:
            fallbacks = ", ".join(settings.openrouter_fallback_models) or "none"
            print(f"OK   settings: WAHA {settings.waha_base_url}, LLM {settings.openrouter_base_url} "
                  f"model {settings.openrouter_model} (fallbacks: {fallbacks}), state {settings.state_db}")
        if "--check-settings" in args:
            return 0
        if "--check" in args:
            results = check_deployment(settings)
            for result in results:
                print(result.line())
            return 0 if all(result.ok for result in results) else 1
        recover_after_restart(settings)
        application = create_app(settings)
    except SettingsError as exc:
        print(f"FAIL settings: {exc}" if "--check" in args else f"whatsapp_webhook_server: {exc}", file=sys.stderr)
        return 2
    log.info("starting development server on %s:%d (use gunicorn in production)", settings.host, settings.port)
    start_worker(application)
    # The Werkzeug debugger executes code typed into the browser: never offer it beyond this machine.
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    application.run(host=settings.host, port=settings.port, debug=settings.debug, use_debugger=settings.debug and loopback,
                    threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
