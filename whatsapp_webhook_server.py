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
import email.utils
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

__version__ = "1.0.0"
SERVICE_NAME = "whatsapp-webhook-server"
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
    openrouter_model: str = "google/gemini-2.0-flash-001"
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
    reply_in_groups: bool = False
    fallback_message: str = DEFAULT_FALLBACK_MESSAGE
    non_text_reply: str = DEFAULT_NON_TEXT_REPLY
    typing_simulation: bool = True
    webhook_sync_wait_seconds: float = 20.0
    max_body_bytes: int = 1024 * 1024

    @property
    def uses_openrouter(self) -> bool:
        return (urlparse(self.openrouter_base_url).hostname or "").endswith("openrouter.ai")

    @property
    def processing_lease_seconds(self) -> float:
        """How long a claimed message may stay in progress before a redelivery may take it over."""
        waha_budget = self.waha_timeout_seconds * (self.waha_send_attempts + 3)
        return self.llm_deadline_seconds + waha_budget + 30.0

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
            openrouter_model=env.text("OPENROUTER_MODEL", "google/gemini-2.0-flash-001"),
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
            reply_in_groups=env.boolean("REPLY_IN_GROUPS", False),
            fallback_message=env.text("FALLBACK_MESSAGE", DEFAULT_FALLBACK_MESSAGE),
            non_text_reply=env.text("NON_TEXT_REPLY", DEFAULT_NON_TEXT_REPLY),
            typing_simulation=env.boolean("TYPING_SIMULATION", True),
            webhook_sync_wait_seconds=env.number("WEBHOOK_SYNC_WAIT_SECONDS", 20.0, minimum=0.0, maximum=600),
            max_body_bytes=env.integer("MAX_BODY_BYTES", 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024),
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
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            self.problems.append(f"{name} must be a whole number from {minimum} to {maximum}, got {raw!r}")
            return default
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not minimum <= value <= maximum:
            self.problems.append(f"{name} must be a number from {minimum:g} to {maximum:g}, got {raw!r}")
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

    def require_real(self, name: str, value: str, what: str) -> None:
        if not value:
            self.problems.append(f"{name} is not set: put {what} there")
        elif any(marker in value for marker in PLACEHOLDER_MARKERS):
            self.problems.append(f"{name} still holds the placeholder from .env.webhook.example: put {what} there")


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
MESSAGE_ID_PATTERN = re.compile(r"^(?:true|false)_[^_]+_([^_]+)(?:_.+)?$")


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

    @property
    def is_group(self) -> bool:
        return self.chat_id.endswith("@g.us")


@dataclass(frozen=True)
class Ignored:
    """Why an event gets no reply; `reason` is a stable code, `detail` is for humans."""

    reason: str
    detail: str


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
    return value


def _json_type(kind: type) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(kind, kind.__name__)


def classify_event(event: WebhookEvent, *, reply_in_groups: bool) -> IncomingMessage | Ignored:
    """Decide whether a parsed event is a customer message to answer, and if not, why."""
    if event.event not in ANSWERED_EVENTS:
        return Ignored("event_not_handled", f"event '{event.event}' is not a new message")
    payload = event.payload
    if payload is None:
        raise BadRequestError(f"field 'payload' is required for '{event.event}' events")
    if not event.session:
        raise BadRequestError("field 'session' is required to know which WAHA session to reply from")
    chat_id = _field(payload, "from", str, required=True, where="payload.")
    message_id = _field(payload, "id", str, required=True, where="payload.")
    from_me = _field(payload, "fromMe", bool, where="payload.")
    source = _field(payload, "source", str, where="payload.")
    participant = _field(payload, "participant", str, where="payload.")
    body = _field(payload, "body", str, where="payload.")
    has_media = _field(payload, "hasMedia", bool, where="payload.")
    media = _field(payload, "media", dict, where="payload.")
    timestamp = _field(payload, "timestamp", (int, float), where="payload.")

    if from_me or source == "api":
        return Ignored("from_me", "message was sent by this WhatsApp account")
    if chat_id in event.me_ids or (participant is not None and participant in event.me_ids):
        return Ignored("own_number", "message comes from the bot's own number")
    if chat_id == "status@broadcast":
        return Ignored("status_broadcast", "status updates are not answered")
    if chat_id.endswith("@broadcast"):
        return Ignored("broadcast_list", "broadcast lists are not answered")
    if chat_id.endswith("@newsletter"):
        return Ignored("channel", "channel posts are not answered")
    if chat_id.endswith("@g.us") and not reply_in_groups:
        return Ignored("group_chat", "group messages are not answered (REPLY_IN_GROUPS=false)")

    text = body.strip() if body else ""
    has_other_content = bool(has_media or media or payload.get("location") or payload.get("vCards"))
    if not text and not has_other_content:
        return Ignored("no_content", "message has neither text nor media")

    match = MESSAGE_ID_PATTERN.match(message_id)
    bare_id = match.group(1) if match else message_id
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
        timestamp=float(timestamp) if timestamp is not None else None,
    )


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
    return hmac.compare_digest(compute_waha_hmac(body, key), signature.strip().lower())


def verify_token(provided: str | None, expected: str) -> bool:
    """Constant-time comparison of the shared X-Webhook-Token."""
    return provided is not None and hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))


# ---------------------------------------------------------------------------
# Store: shared state for every gunicorn worker (SQLite)
# ---------------------------------------------------------------------------

class StoreUnavailable(Exception):
    """The state store could not be read or written."""


@dataclass(frozen=True)
class Claim:
    """Result of trying to take ownership of a message before doing any work on it."""

    owned: bool
    status: str  # processing | send_failed | done
    stored_reply: str | None = None
    stored_outcome: str | None = None


STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    event_id TEXT,
    status TEXT NOT NULL,
    outcome TEXT,
    reply_text TEXT,
    sent_message_id TEXT,
    attempts INTEGER NOT NULL,
    lease_expires_at REAL NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_status ON messages (status);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
IGNORED_COUNTER_PREFIX = "ignored."


class StateStore:
    """Message claims and counters in one SQLite file, safe across threads and processes.

    Every state change is a short write transaction, so SQLite's file lock makes claims
    atomic across gunicorn workers. Connections are per thread and per process: a
    connection must never cross a fork.
    """

    def __init__(self, path: str, *, lease_seconds: float = 300.0, busy_timeout_ms: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.lease_seconds = lease_seconds
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self._local = threading.local()

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
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
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

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store error: {exc}") from exc

    @staticmethod
    def _bump(connection: sqlite3.Connection, name: str, amount: int = 1) -> None:
        connection.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def count(self, name: str, amount: int = 1) -> None:
        self._transaction(lambda c: self._bump(c, name, amount))

    def count_ignored(self, reason: str) -> None:
        self.count(IGNORED_COUNTER_PREFIX + reason)

    def claim(self, message: IncomingMessage) -> Claim:
        """Atomically take a message: new, or handed back for redelivery, or abandoned past its lease."""
        now = self.clock()
        lease = now + self.lease_seconds

        def work(c: sqlite3.Connection) -> Claim:
            inserted = c.execute(
                "INSERT INTO messages (key, session, chat_id, event_id, status, attempts, lease_expires_at,"
                " received_at, updated_at) VALUES (?, ?, ?, ?, 'processing', 1, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                (message.dedupe_key, message.session, message.chat_id, message.event_id, lease, now, now),
            ).rowcount
            if inserted:
                self._bump(c, "messages_received")
                return Claim(owned=True, status="processing")
            taken = c.execute(
                "UPDATE messages SET status = 'processing', attempts = attempts + 1, lease_expires_at = ?,"
                " updated_at = ?, event_id = ? WHERE key = ? AND (status = 'send_failed'"
                " OR (status = 'processing' AND lease_expires_at < ?)) RETURNING reply_text, outcome",
                (lease, now, message.event_id, message.dedupe_key, now),
            ).fetchone()
            if taken:
                return Claim(owned=True, status="processing", stored_reply=taken[0], stored_outcome=taken[1])
            row = c.execute("SELECT status FROM messages WHERE key = ?", (message.dedupe_key,)).fetchone()
            return Claim(owned=False, status=row[0] if row else "unknown")

        return self._transaction(work)

    def save_reply(self, key: str, text: str, outcome: str) -> None:
        """Keep the reply before sending it, so a redelivery resends the same words without a new LLM call."""
        self._transaction(lambda c: c.execute(
            "UPDATE messages SET reply_text = ?, outcome = ?, updated_at = ? WHERE key = ?",
            (text, outcome, self.clock(), key)))

    def mark_sent(self, key: str, *, outcome: str, sent_message_id: str | None) -> None:
        def work(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE messages SET status = 'done', outcome = ?, sent_message_id = ?, last_error = NULL,"
                " updated_at = ? WHERE key = ?", (outcome, sent_message_id, self.clock(), key))
            # A fallback reply means the LLM failed: the customer got an apology, not an answer.
            self._bump(c, "messages_failed" if outcome == "fallback" else "messages_processed")

        self._transaction(work)

    def release_for_redelivery(self, key: str, error: str) -> None:
        """Give up this attempt; the next delivery of the same message may claim it again."""
        self._transaction(lambda c: c.execute(
            "UPDATE messages SET status = 'send_failed', last_error = ?, updated_at = ? WHERE key = ?",
            (error[:500], self.clock(), key)))

    def snapshot(self) -> dict[str, Any]:
        """Counters plus the live count of unfinished messages, read in one transaction."""
        def work(c: sqlite3.Connection) -> dict[str, Any]:
            counters = dict(c.execute("SELECT name, value FROM counters").fetchall())
            by_status = dict(c.execute(
                "SELECT status, COUNT(*) FROM messages WHERE status != 'done' GROUP BY status").fetchall())
            return {"counters": counters, "by_status": by_status}

        return self._transaction(work)

    def ping(self) -> None:
        try:
            self._connection().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store error: {exc}") from exc

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local = threading.local()


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


class WahaError(UpstreamError):
    service = "waha"


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


def _backoff_seconds(attempt: int, *, base: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with +/-25% jitter, so retries from many chats do not line up."""
    return base * (2 ** (attempt - 1)) * (0.75 + 0.5 * rng())


# ---------------------------------------------------------------------------
# LLM client (OpenRouter or any OpenAI-compatible chat completions API)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMReply:
    text: str
    model: str | None
    usage: Mapping[str, Any]
    attempts: int
    latency_seconds: float


class LLMClient:
    """Asks the chat completions endpoint for one reply, with bounded retries under one deadline."""

    def __init__(self, *, http: httpx.AsyncClient, base_url: str, api_key: str, model: str,
                 max_tokens: int = 512, temperature: float = 0.7, attempt_timeout: float = 30.0,
                 deadline: float = 45.0, max_attempts: int = 3, retry_after_cap: float = 5.0,
                 backoff_base: float = 0.5, app_title: str | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.http = http
        self.url = f"{base_url.rstrip('/')}/chat/completions"
        self.model = model
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

    async def complete(self, messages: list[dict[str, str]], *, user: str | None = None) -> LLMReply:
        """Return the reply text, or raise LLMError once retries or the deadline are used up."""
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": self.max_tokens, "temperature": self.temperature}
        if user:
            body["user"] = user
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
                return LLMReply(text, model, usage, attempt, loop.time() - started)
            except TimeoutError:
                error: LLMError = LLMError(f"no answer within {min(self.attempt_timeout, remaining):.1f}s",
                                           transient=True)
            except LLMError as exc:
                error = exc
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
            log.warning("llm attempt %d failed, retrying in %.2fs: %s", attempt, delay, error)
            await self.sleep(delay)

    async def _attempt(self, body: dict[str, Any]) -> tuple[str, str | None, Mapping[str, Any]]:
        try:
            response = await self.http.post(self.url, json=body, headers=self.headers)
        except httpx.TimeoutException:
            raise LLMError("request timed out", transient=True) from None
        except httpx.TransportError as exc:
            raise LLMError(f"connection failed: {type(exc).__name__}", transient=True) from None
        if response.status_code != 200:
            raise LLMError(_error_message(response), status=response.status_code,
                           transient=response.status_code in TRANSIENT_STATUSES,
                           retry_after=parse_retry_after(response.headers.get("Retry-After")))
        return self._reply_from(response)

    @staticmethod
    def _reply_from(response: httpx.Response) -> tuple[str, str | None, Mapping[str, Any]]:
        """Apply OpenRouter's rule: a 200 is a reply only with choices, no error and non-empty content."""
        try:
            data = response.json()
        except ValueError:
            raise LLMError("200 response is not JSON", status=200, transient=True) from None
        if not isinstance(data, dict):
            raise LLMError("200 response is not a JSON object", status=200, transient=True)
        if isinstance(data.get("error"), dict):
            code = data["error"].get("code")
            raise LLMError(f"error in 200 body: {_error_message(response)}", status=200,
                           transient=not isinstance(code, int) or code in TRANSIENT_STATUSES)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError("200 response has no choices", status=200, transient=True)
        choice = choices[0]
        if choice.get("finish_reason") == "error" or isinstance(choice.get("error"), dict):
            raise LLMError("provider failed while generating (finish_reason=error)", status=200, transient=True)
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
        """Send a text; return the sent message id when the engine's response carries one."""
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
                if not exc.transient or attempt >= self.send_attempts:
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

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self.http.post(self.base_url + path, json=body, headers=self.headers)
        except httpx.TimeoutException:
            raise WahaError(f"{path} timed out", transient=True) from None
        except httpx.TransportError as exc:
            raise WahaError(f"{path} connection failed: {type(exc).__name__}", transient=True) from None
        if response.status_code in (200, 201):
            return response
        # 422 = the WAHA session is not WORKING yet; it may recover in seconds.
        transient = response.status_code == 422 or response.status_code in TRANSIENT_STATUSES
        raise WahaError(f"{path} failed: {_error_message(response)}", status=response.status_code, transient=transient)


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
# The reply pipeline
# ---------------------------------------------------------------------------

class ReplyNotSent(Exception):
    """The reply could not be delivered; the message was handed back for WAHA's redelivery."""


@dataclass(frozen=True)
class ReplyResult:
    outcome: str  # success | fallback | non_text
    chat_id: str
    sent_message_id: str | None


def typing_pause_seconds(text: str, *, rng: Callable[[], float] = random.random) -> float:
    """A human-looking typing time: grows with the reply, 1-4 s, randomised (WAHA's anti-ban advice)."""
    return min(4.0, max(1.0, len(text) * 0.02)) * (0.8 + 0.4 * rng())


class ReplyPipeline:
    """Owns one claimed message from LLM call to sendText, and records the outcome."""

    def __init__(self, *, settings: Settings, store: StateStore, llm: LLMClient, waha: WahaClient,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.waha = waha
        self.sleep = sleep
        self.rng = rng

    async def handle(self, message: IncomingMessage, claim: Claim) -> ReplyResult:
        try:
            return await self._reply(message, claim)
        except ReplyNotSent:
            raise
        except BaseException as exc:
            # Whatever broke (a bug, cancellation at shutdown), the message must stay answerable.
            await asyncio.to_thread(self.store.release_for_redelivery, message.dedupe_key, repr(exc))
            raise

    async def _reply(self, message: IncomingMessage, claim: Claim) -> ReplyResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        presence = None
        if self.settings.typing_simulation:
            # Seen + typing while the LLM thinks, so the pause below overlaps the LLM call.
            presence = asyncio.create_task(self._show_typing(message))

        if claim.stored_reply and claim.stored_outcome == "success":
            text, outcome = claim.stored_reply, "success"
            log.info("event=%s chat=%s resending stored reply", message.event_id, message.chat_id)
        else:
            text, outcome = await self._compose(message)
            await asyncio.to_thread(self.store.save_reply, message.dedupe_key, text, outcome)

        if presence is not None:
            await presence
            remaining = typing_pause_seconds(text, rng=self.rng) - (loop.time() - started)
            if remaining > 0:
                await self.sleep(remaining)
            await self._quietly("stopTyping", self.waha.stop_typing(session=message.session, chat_id=message.chat_id))

        try:
            sent_id = await self.waha.send_text(session=message.session, chat_id=message.chat_id, text=text)
        except WahaError as exc:
            await asyncio.to_thread(self.store.release_for_redelivery, message.dedupe_key, str(exc))
            log.error("event=%s chat=%s decision=send_failed error=%s", message.event_id, message.chat_id, exc)
            raise ReplyNotSent(str(exc)) from exc
        await asyncio.to_thread(self.store.mark_sent, message.dedupe_key, outcome=outcome, sent_message_id=sent_id)
        log.info("event=%s chat=%s decision=replied outcome=%s chars=%d sent_id=%s total_ms=%.0f",
                 message.event_id, message.chat_id, outcome, len(text), sent_id, (loop.time() - started) * 1000)
        return ReplyResult(outcome=outcome, chat_id=message.chat_id, sent_message_id=sent_id)

    async def _compose(self, message: IncomingMessage) -> tuple[str, str]:
        if message.text is None:
            return self.settings.non_text_reply, "non_text"
        prompt = [{"role": "system", "content": self.settings.ai_system_prompt},
                  {"role": "user", "content": message.text}]
        # OpenRouter's abuse tracking wants a stable end-user id; a hash never reveals the number.
        user = hashlib.sha256(message.chat_id.encode("utf-8")).hexdigest()[:32]
        try:
            reply = await self.llm.complete(prompt, user=user)
        except LLMError as exc:
            log.error("event=%s chat=%s llm_failed=%s -> fallback", message.event_id, message.chat_id, exc)
            return self.settings.fallback_message, "fallback"
        log.info("event=%s chat=%s llm_ok model=%s attempts=%d llm_ms=%.0f tokens=%s", message.event_id,
                 message.chat_id, reply.model, reply.attempts, reply.latency_seconds * 1000,
                 reply.usage.get("total_tokens"))
        return reply.text, "success"

    async def _show_typing(self, message: IncomingMessage) -> None:
        await self._quietly("sendSeen", self.waha.send_seen(
            session=message.session, chat_id=message.chat_id, message_id=message.message_id,
            participant=message.participant if message.is_group else None))
        await self._quietly("startTyping", self.waha.start_typing(session=message.session, chat_id=message.chat_id))

    async def _quietly(self, what: str, call: Awaitable[None]) -> None:
        """Presence calls are cosmetic: their failure must never cost the customer the reply."""
        try:
            await call
        except WahaError as exc:
            log.warning("%s failed (ignored): %s", what, exc)


# ---------------------------------------------------------------------------
# Per-process runtime: one event loop thread and one HTTP client per upstream
# ---------------------------------------------------------------------------

class BackgroundLoop:
    """An asyncio loop in a daemon thread; Flask's threads hand it coroutines."""

    def __init__(self, *, name: str = "reply-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, *, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


class WorkerRuntime:
    """Everything that must exist once per worker process and never cross a fork."""

    def __init__(self, *, settings: Settings, store: StateStore,
                 llm_transport: httpx.AsyncBaseTransport | None = None,
                 waha_transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.pid = os.getpid()
        self.background = BackgroundLoop()
        self.llm_http = httpx.AsyncClient(
            transport=llm_transport,
            timeout=httpx.Timeout(connect=5.0, read=settings.llm_attempt_timeout_seconds, write=10.0,
                                  pool=settings.llm_attempt_timeout_seconds),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        self.waha_http = httpx.AsyncClient(
            transport=waha_transport,
            timeout=httpx.Timeout(connect=5.0, read=settings.waha_timeout_seconds, write=10.0,
                                  pool=settings.waha_timeout_seconds),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=50))
        llm = LLMClient(
            http=self.llm_http, base_url=settings.openrouter_base_url, api_key=settings.openrouter_api_key,
            model=settings.openrouter_model, max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature, attempt_timeout=settings.llm_attempt_timeout_seconds,
            deadline=settings.llm_deadline_seconds, max_attempts=settings.llm_max_attempts,
            app_title=SERVICE_NAME if settings.uses_openrouter else None, sleep=sleep)
        waha = WahaClient(http=self.waha_http, base_url=settings.waha_base_url, api_key=settings.waha_api_key,
                          send_attempts=settings.waha_send_attempts, sleep=sleep)
        self.pipeline = ReplyPipeline(settings=settings, store=store, llm=llm, waha=waha, sleep=sleep)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return self.background.submit(coro)

    def close(self, *, timeout: float = 5.0) -> None:
        async def close_clients() -> None:
            await self.llm_http.aclose()
            await self.waha_http.aclose()

        try:
            self.submit(close_clients()).result(timeout)
        except Exception as exc:  # closing must never stop a worker from exiting
            log.warning("closing HTTP clients failed: %r", exc)
        self.background.stop(timeout=timeout)


# ---------------------------------------------------------------------------
# The webhook service (pure core) and the Flask app (thin adapter)
# ---------------------------------------------------------------------------

def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class WebhookService:
    """Turns one webhook request (raw bytes + headers) into a JSON answer and a status code."""

    def __init__(self, *, settings: Settings, store: StateStore, started_at: float,
                 runtime_factory: Callable[[], WorkerRuntime]) -> None:
        self.settings = settings
        self.store = store
        self.started_at = started_at
        self._runtime_factory = runtime_factory
        self._runtime: WorkerRuntime | None = None
        self._runtime_lock = threading.Lock()

    def runtime(self) -> WorkerRuntime:
        """The worker's runtime, built lazily on first use so it is always born after gunicorn's fork."""
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._runtime_lock:
            if self._runtime is None or self._runtime.pid != os.getpid():
                self._runtime = self._runtime_factory()
            return self._runtime

    def close(self) -> None:
        with self._runtime_lock:
            if self._runtime is not None and self._runtime.pid == os.getpid():
                self._runtime.close()
            self._runtime = None
        self.store.close()

    def handle_webhook(self, body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], int]:
        request_id = headers.get("X-Webhook-Request-Id", "-")
        rejection = self._check_sender(body, headers)
        if rejection is not None:
            log.warning("request=%s rejected status=401 reason=%s", request_id, rejection)
            self._count_quietly("requests_unauthorized")
            return {"error": rejection}, 401
        try:
            if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                raise BadRequestError("Content-Type must be application/json", status=415)
            event = parse_event(body)
            decision = classify_event(event, reply_in_groups=self.settings.reply_in_groups)
        except BadRequestError as exc:
            log.warning("request=%s rejected status=%d error=%s", request_id, exc.status, exc.message)
            self._count_quietly("requests_rejected")
            return {"error": exc.message}, exc.status

        if isinstance(decision, Ignored):
            return self._ignore(event.event_id, self._chat_of(event), decision)
        message = decision
        try:
            claim = self.store.claim(message)
        except StoreUnavailable as exc:
            log.error("event=%s chat=%s store unavailable, asking WAHA to redeliver: %s",
                      message.event_id, message.chat_id, exc)
            return {"error": "state store unavailable; retry later"}, 503
        if not claim.owned:
            detail = "message already answered" if claim.status == "done" else "message is being answered"
            return self._ignore(message.event_id, message.chat_id, Ignored("duplicate", detail))

        log.info("event=%s chat=%s engine=%s decision=reply key=%s text_chars=%d", message.event_id,
                 message.chat_id, message.engine, message.dedupe_key, len(message.text or ""))
        return self._run_pipeline(message, claim)

    def _run_pipeline(self, message: IncomingMessage, claim: Claim) -> tuple[dict[str, Any], int]:
        try:
            runtime = self.runtime()
            future = runtime.submit(runtime.pipeline.handle(message, claim))
        except Exception as exc:
            self.store.release_for_redelivery(message.dedupe_key, repr(exc))
            log.exception("event=%s could not start the reply pipeline", message.event_id)
            return {"error": "reply pipeline unavailable; retry later"}, 503
        try:
            result = future.result(timeout=self.settings.webhook_sync_wait_seconds)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(lambda f: self._log_late_outcome(message, f))
            log.info("event=%s chat=%s decision=accepted (reply continues in background)",
                     message.event_id, message.chat_id)
            return {"status": "accepted", "message_key": message.dedupe_key,
                    "detail": "reply is being prepared and will be sent", "timestamp": utc_now_iso()}, 202
        except ReplyNotSent as exc:
            return {"error": f"reply could not be sent, please redeliver: {exc}"}, 503
        except Exception:
            log.exception("event=%s chat=%s reply pipeline crashed", message.event_id, message.chat_id)
            return {"error": "internal error while replying; please redeliver"}, 500
        return {"status": "processed",
                "result": {"status": result.outcome, "from_number": result.chat_id, "response_sent": True,
                           "message_id": result.sent_message_id},
                "timestamp": utc_now_iso()}, 200

    @staticmethod
    def _log_late_outcome(message: IncomingMessage, future: concurrent.futures.Future[ReplyResult]) -> None:
        if future.cancelled() or future.exception() is None:
            return
        # WAHA already got 202 and will not redeliver: the row stays 'send_failed' for an operator to see.
        log.error("event=%s chat=%s reply failed after the webhook was acknowledged: %s",
                  message.event_id, message.chat_id, future.exception())

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
        self._count_quietly(IGNORED_COUNTER_PREFIX + ignored.reason)
        return {"status": "ignored", "reason": ignored.reason, "detail": ignored.detail}, 200

    @staticmethod
    def _chat_of(event: WebhookEvent) -> str | None:
        chat = (event.payload or {}).get("from")
        return chat if isinstance(chat, str) else None

    def _count_quietly(self, name: str) -> None:
        """Counting ignored or rejected requests is best effort: a store hiccup must not turn them into errors."""
        try:
            self.store.count(name)
        except StoreUnavailable as exc:
            log.warning("could not count %s: %s", name, exc)

    def status_document(self, status: str) -> dict[str, Any]:
        """The JSON shared by /health, /stats and GET on the webhook."""
        snapshot = self.store.snapshot()
        counters: dict[str, int] = snapshot["counters"]
        by_status: dict[str, int] = snapshot["by_status"]
        ignored = {name[len(IGNORED_COUNTER_PREFIX):]: value for name, value in sorted(counters.items())
                   if name.startswith(IGNORED_COUNTER_PREFIX)}
        return {
            "status": status,
            "service": SERVICE_NAME,
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "stats": {
                "messages_received": counters.get("messages_received", 0),
                "messages_processed": counters.get("messages_processed", 0),
                "messages_failed": counters.get("messages_failed", 0),
                "messages_in_progress": by_status.get("processing", 0) + by_status.get("send_failed", 0),
                "messages_awaiting_redelivery": by_status.get("send_failed", 0),
                "messages_ignored": sum(ignored.values()),
                "ignored_by_reason": ignored,
                "requests_rejected": counters.get("requests_rejected", 0),
                "requests_unauthorized": counters.get("requests_unauthorized", 0),
                "server_started_at": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds"),
            },
            "timestamp": utc_now_iso(),
        }


def configure_logging(settings: Settings) -> None:
    """Console plus LOG_FILE, one format; safe to call again (handlers are replaced, not stacked)."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file:
        try:
            # WatchedFileHandler reopens the file after logrotate moves it, and several workers may share it.
            handlers.append(logging.handlers.WatchedFileHandler(settings.log_file, encoding="utf-8"))
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
    store = store or StateStore(settings.state_db, lease_seconds=settings.processing_lease_seconds)
    store.initialize()
    # gunicorn.conf.py records the master's start so every worker reports the same uptime.
    started_at = float(os.environ.get("WEBHOOK_SERVER_STARTED_AT") or time.time())
    service = WebhookService(
        settings=settings, store=store, started_at=started_at,
        runtime_factory=lambda: WorkerRuntime(settings=settings, store=store, llm_transport=llm_transport,
                                              waha_transport=waha_transport, sleep=sleep))

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
        document = service.status_document("active")
        document["endpoint"] = WEBHOOK_PATH
        document["accepts"] = "POST application/json (WAHA webhook events: message, message.any)"
        return jsonify(document)

    @app.get("/health")
    def health() -> Any:
        try:
            service.store.ping()
            return jsonify(service.status_document("healthy"))
        except StoreUnavailable as exc:
            log.error("health check failed: %s", exc)
            return jsonify({"status": "unhealthy", "service": SERVICE_NAME, "version": __version__,
                            "error": "state store unavailable", "timestamp": utc_now_iso()}), 503

    @app.get("/stats")
    def stats() -> Any:
        return jsonify(service.status_document("ok"))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if exc.code == 413:
            log.warning("request rejected status=413 (body over MAX_BODY_BYTES=%d)", settings.max_body_bytes)
            service._count_quietly("requests_rejected")
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


def shutdown(app: Flask | None = None) -> None:
    """Release this worker's loop, clients and database connection (gunicorn's worker_exit hook)."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].close()


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


def main(argv: list[str] | None = None) -> int:
    """Run Flask's development server (production uses gunicorn; see start_webhook_server.sh)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
        if "--check-settings" in args:
            print(f"settings OK: WAHA {settings.waha_base_url}, LLM {settings.openrouter_base_url} "
                  f"model {settings.openrouter_model}, state {settings.state_db}")
            return 0
        application = create_app(settings)
    except SettingsError as exc:
        print(f"whatsapp_webhook_server: {exc}", file=sys.stderr)
        return 2
    log.info("starting development server on %s:%d (use gunicorn in production)", settings.host, settings.port)
    application.run(host=settings.host, port=settings.port, debug=settings.debug, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
