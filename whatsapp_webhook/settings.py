"""Typed settings: every knob of the server, read once from the environment and .env.webhook, validated
with a message that says how to fix each problem.

Each field of Settings is declared once, with setting(...): its variable, default, bounds or choices and
help. Settings.from_env reads every field from that declaration (declared_settings), then checks what
spans fields; setting_names and unknown_setting_warnings use the same declaration."""

from __future__ import annotations

import difflib
import functools
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from urllib.parse import urlparse

from whatsapp_webhook.env_reader import (
    KIND_OF_TYPE,
    PLACEHOLDER_MARKERS,
    POSTGRES_SCHEMES,
    SETTING_KEY,
    EnvReader,
    Setting,
    SettingKind,
    SettingsError,
    is_postgres_url,
    redact_url,
    setting,
)
from whatsapp_webhook.hours import DEFAULT_TIMEZONE, OUT_OF_HOURS_MODES, schedule_problems
from whatsapp_webhook.knowledge import knowledge_problems
from whatsapp_webhook.sessions_config import sessions_problems
from whatsapp_webhook.texts import (
    DEFAULT_FALLBACK_MESSAGE,
    DEFAULT_MEDIA_UNAVAILABLE_REPLY,
    DEFAULT_MEDIA_UNSUPPORTED_REPLY,
    DEFAULT_NON_TEXT_REPLY,
    DEFAULT_OUT_OF_HOURS_NOTICE,
    DEFAULT_RATE_LIMIT_REPLY,
    DEFAULT_RESET_REPLY,
    DEFAULT_START_REPLY,
    DEFAULT_STOP_REPLY,
    DEFAULT_SYSTEM_PROMPT,
)

# The folder of whatsapp_webhook_server.py: the default state file and .env.webhook live beside it.
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Served on OpenRouter as of 2026-12 (../shared/reference/openrouter.md §9); `--check` verifies them
# against GET /models, because ids are retired every few months.
DEFAULT_MODEL = "google/gemini-3.1-flash-lite"


DEFAULT_FALLBACK_MODELS = ("google/gemini-3.5-flash",)


REASONING_EFFORTS = ("NONE", "MINIMAL", "LOW", "MEDIUM", "HIGH")


DEFAULT_STATE_DB = os.path.join(PROJECT_DIR, "data", "whatsapp_webhook_state.db")


DEFAULT_ENV_FILE = ".env.webhook"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the server, loaded once from the environment and validated."""

    host: str = setting("WEBHOOK_HOST", "0.0.0.0", help="Address to listen on (0.0.0.0 = every interface).")
    port: int = setting("WEBHOOK_PORT", 5002, bounds=(1, 65535), help="Port to listen on.")
    debug: bool = setting(
        "DEBUG", False, help="true = Flask development server with debug output (never in production)."
    )
    openrouter_api_key: str = setting(
        "OPENROUTER_API_KEY", "", secret=True, help="The LLM server's key; required for openrouter.ai."
    )
    openrouter_base_url: str = setting(
        "OPENROUTER_BASE_URL",
        "https://openrouter.ai/api/v1",
        kind="url",
        help="OpenRouter or any OpenAI-compatible API.",
    )
    openrouter_model: str = setting("OPENROUTER_MODEL", DEFAULT_MODEL, help="The model asked first.")
    openrouter_fallback_models: tuple[str, ...] = setting(
        "OPENROUTER_FALLBACK_MODELS",
        DEFAULT_FALLBACK_MODELS,
        help="Tried in order when OPENROUTER_MODEL fails or is not served (comma-separated; none = no fallback).",
    )
    llm_reasoning_effort: str = setting(
        "LLM_REASONING_EFFORT",
        "minimal",
        choices=REASONING_EFFORTS,
        lower=True,
        help="OpenRouter only: how much a thinking model may think before answering.",
    )
    ai_system_prompt: str = setting(
        "AI_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, help="The system prompt (the built-in one answers in kind)."
    )
    llm_max_tokens: int = setting(
        "LLM_MAX_TOKENS", 512, bounds=(1, 100_000), help="Most tokens the LLM may spend on one reply."
    )
    llm_temperature: float = setting("LLM_TEMPERATURE", 0.7, bounds=(0.0, 2.0), help="The LLM's sampling temperature.")
    llm_attempt_timeout_seconds: float = setting(
        "LLM_TIMEOUT_SECONDS", 30.0, bounds=(0.1, 600), help="Seconds one LLM request may take."
    )
    llm_deadline_seconds: float = setting(
        "LLM_DEADLINE_SECONDS", 45.0, bounds=(0.1, 900), help="Seconds all LLM attempts for a reply may take."
    )
    llm_max_attempts: int = setting(
        "LLM_MAX_ATTEMPTS", 3, bounds=(1, 10), help="LLM requests per reply, retries included."
    )
    waha_base_url: str = setting("WAHA_BASE_URL", "http://localhost:3000", kind="url", help="Where WAHA listens.")
    waha_api_key: str = setting(
        "WAHA_API_KEY", "", secret=True, help="The key WAHA was started with (its WAHA_API_KEY)."
    )
    waha_timeout_seconds: float = setting(
        "WAHA_TIMEOUT_SECONDS", 15.0, bounds=(0.1, 300), help="Seconds one WAHA call may take."
    )
    waha_send_attempts: int = setting(
        "WAHA_SEND_ATTEMPTS",
        3,
        bounds=(1, 10),
        help="sendText attempts while WAHA surely sent nothing (after a lost answer the chat is checked instead).",
    )
    webhook_secret_token: str | None = setting(
        "WEBHOOK_SECRET_TOKEN",
        None,
        secret=True,
        help="When set, every request must carry header X-Webhook-Token with this value.",
    )
    webhook_hmac_key: str | None = setting(
        "WEBHOOK_HMAC_KEY",
        None,
        secret=True,
        help="When set, every request must carry WAHA's X-Webhook-Hmac (sha512 of the body with this key).",
    )
    webhook_stale_seconds: float = setting(
        "WEBHOOK_STALE_SECONDS",
        86_400.0,
        bounds=(60, 30 * 86_400),
        help="With WEBHOOK_HMAC_KEY: a signed event whose own timestamp is older than this is a replay, ignored.",
    )
    state_db: str = setting(
        "STATE_DB",
        DEFAULT_STATE_DB,
        kind="path",
        secret=True,  # a URL may carry the database password
        help="SQLite file shared by all workers, or a postgresql:// URL (PostgreSQL; TLS and options in the URL).",
    )
    state_db_pool_size: int = setting(
        "STATE_DB_POOL_SIZE",
        10,
        bounds=(1, 1000),
        help="PostgreSQL only: most connections each gunicorn worker opens (opened as needed, after the fork).",
    )
    state_db_timeout_seconds: float = setting(
        "STATE_DB_TIMEOUT_SECONDS",
        5.0,
        bounds=(0.1, 300),
        help="PostgreSQL only: seconds a store call waits for a connection or a statement before giving up (503).",
    )
    log_file: str | None = setting(
        "LOG_FILE", "/tmp/whatsapp_webhook.log", help="Also log to this file (empty = standard output only)."
    )
    log_level: str = setting(
        "LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="The lowest level logged."
    )
    log_format: str = setting(
        "LOG_FORMAT", "text", choices=("TEXT", "JSON"), lower=True, help="text, or json (one object per line)."
    )
    log_max_bytes: int = setting(
        "LOG_MAX_BYTES", 10 * 1024 * 1024, bounds=(0, 2**40), help="LOG_FILE rotates at this size (0 = never)."
    )
    log_backup_count: int = setting("LOG_BACKUP_COUNT", 5, bounds=(1, 1000), help="Rotated log files kept.")
    reply_in_groups: bool = setting("REPLY_IN_GROUPS", False, help="Answer in group chats too.")
    fallback_message: str = setting(
        "FALLBACK_MESSAGE", DEFAULT_FALLBACK_MESSAGE, help="Sent when the LLM cannot answer."
    )
    non_text_reply: str = setting(
        "NON_TEXT_REPLY",
        DEFAULT_NON_TEXT_REPLY,
        help="Sent for a location or contact card (and media when MEDIA_ENABLED=false).",
    )
    typing_simulation: bool = setting(
        "TYPING_SIMULATION", True, help="WAHA's anti-ban recipe: seen, typing, a pause, then the text."
    )
    webhook_sync_wait_seconds: float = setting(
        "WEBHOOK_SYNC_WAIT_SECONDS",
        20.0,
        bounds=(0.0, 600),
        help="How long the webhook waits for the reply before answering WAHA 202 (the reply still goes out).",
    )
    webhook_max_waiting: int = setting(
        "WEBHOOK_MAX_WAITING",
        16,
        bounds=(0, 10_000),
        help="Webhook requests per worker that wait for their reply; the rest get 202 at once.",
    )
    max_body_bytes: int = setting(
        "MAX_BODY_BYTES", 1024 * 1024, bounds=(1024, 64 * 1024 * 1024), help="Larger webhook bodies are refused (413)."
    )
    request_read_timeout_seconds: float = setting(
        "REQUEST_READ_TIMEOUT_SECONDS", 10.0, bounds=(1.0, 300), help="Seconds a client gets to send a whole request."
    )
    reply_max_attempts: int = setting(
        "REPLY_MAX_ATTEMPTS", 5, bounds=(1, 100), help="Attempts before a reply that keeps failing is given up."
    )
    reply_max_sends: int = setting(
        "REPLY_MAX_SENDS",
        10,
        bounds=(1, 1000),
        help="Most times one message's reply goes to sendText, our retries and WAHA's redeliveries together"
        " (unset: 10 or 2 x REPLY_MAX_ATTEMPTS, whichever is more).",
    )
    reply_retry_seconds: float = setting(
        "REPLY_RETRY_SECONDS",
        10.0,
        bounds=(0.0, 3600),
        help="First retry after this many seconds, then x3 each time (max 15 min).",
    )
    lease_seconds: float = setting(
        "LEASE_SECONDS",
        30.0,
        bounds=(1.0, 3600),
        help="A worker that dies loses its messages to another worker after this lease.",
    )
    state_retention_hours: float = setting(
        "STATE_RETENTION_HOURS",
        72.0,
        bounds=(0.01, 24 * 365),
        help="Finished messages are forgotten after this many hours (counters keep their totals).",
    )
    max_replies_in_flight: int = setting(
        "MAX_REPLIES_IN_FLIGHT", 256, bounds=(1, 10_000), help="Replies prepared at the same time per gunicorn worker."
    )
    history_turns: int = setting("HISTORY_TURNS", 10, bounds=(0, 200), help="Turns of the chat the LLM sees.")
    history_ttl_minutes: float = setting(
        "HISTORY_TTL_MINUTES", 180.0, bounds=(0.0, 525_600), help="How long turns are kept for the LLM."
    )
    history_max_chars: int = setting(
        "HISTORY_MAX_CHARS", 8000, bounds=(0, 1_000_000), help="The size budget of those turns."
    )
    reset_command: str = setting("RESET_COMMAND", "/reset", help="A customer's message that starts a new conversation.")
    reset_reply: str = setting("RESET_REPLY", DEFAULT_RESET_REPLY, help="Sent after RESET_COMMAND.")
    debounce_seconds: float = setting(
        "DEBOUNCE_SECONDS",
        3.0,
        bounds=(0.0, 120),
        help="Messages from one chat within this many seconds get one answer (0 = off).",
    )
    max_message_chars: int = setting(
        "MAX_MESSAGE_CHARS",
        1500,
        bounds=(100, 65_536),
        help="Longer replies are sent in parts of at most this many characters.",
    )
    handoff_pause_minutes: float = setting(
        "HANDOFF_PAUSE_MINUTES",
        60.0,
        bounds=(0.0, 525_600),
        help="A person answering from this account's phone or WhatsApp Web pauses the bot in that chat (0 = off).",
    )
    bot_pause_command: str = setting(
        "BOT_PAUSE_COMMAND", "/bot off", help="Sent from this account: pauses the bot in that chat until resumed."
    )
    bot_resume_command: str = setting(
        "BOT_RESUME_COMMAND", "/bot on", help="Sent from this account: resumes the bot in that chat."
    )
    stop_word: str = setting("STOP_WORD", "PARAR", help="A customer writing it gets no bot replies until START_WORD.")
    start_word: str = setting("START_WORD", "VOLTAR", help="Turns bot replies back on after STOP_WORD.")
    stop_reply: str = setting("STOP_REPLY", DEFAULT_STOP_REPLY, help="Sent after STOP_WORD.")
    start_reply: str = setting("START_REPLY", DEFAULT_START_REPLY, help="Sent after START_WORD.")
    rate_limit_per_minute: int = setting(
        "RATE_LIMIT_PER_MINUTE", 10, bounds=(1, 100_000), help="Messages per chat and minute that get answers."
    )
    daily_message_limit: int = setting(
        "DAILY_MESSAGE_LIMIT", 200, bounds=(1, 1_000_000), help="Messages per chat and day that get answers."
    )
    rate_limit_reply: str = setting(
        "RATE_LIMIT_REPLY", DEFAULT_RATE_LIMIT_REPLY, help="The one notice a chat gets beyond a limit."
    )
    loop_repeats: int = setting(
        "LOOP_REPEATS", 5, bounds=(2, 1000), help="The same text this often within LOOP_WINDOW_SECONDS pauses the chat."
    )
    loop_window_seconds: float = setting(
        "LOOP_WINDOW_SECONDS", 120.0, bounds=(1.0, 86_400), help="The window LOOP_REPEATS counts in."
    )
    loop_pause_minutes: float = setting(
        "LOOP_PAUSE_MINUTES", 60.0, bounds=(0.0, 525_600), help="How long a detected loop pauses the chat."
    )
    # The business: opening hours, what the bot knows, one configuration per number (docs/negocio.md).
    business_hours: str = setting(
        "BUSINESS_HOURS", "", help="Opening hours, e.g. 'seg-sex 08:00-18:00; sab 08:00-12:00' (empty = always open)."
    )
    business_timezone: str = setting(
        "BUSINESS_TIMEZONE", DEFAULT_TIMEZONE, help="The IANA time zone of BUSINESS_HOURS and of the daily budget."
    )
    business_holidays: str = setting(
        "BUSINESS_HOLIDAYS", "", help="Closed dates, ISO (YYYY-MM-DD), separated by commas."
    )
    out_of_hours_mode: str = setting(
        "OUT_OF_HOURS_MODE",
        "answer",
        choices=OUT_OF_HOURS_MODES,
        lower=True,
        help="Closed: answer (the bot answers, knowing the hours), notice (OUT_OF_HOURS_NOTICE once) or silent.",
    )
    out_of_hours_notice: str = setting(
        "OUT_OF_HOURS_NOTICE",
        DEFAULT_OUT_OF_HOURS_NOTICE,
        help="notice mode: sent once per chat and closed period; {hours} and {next_open} are filled in.",
    )
    ai_knowledge_file: str = setting(
        "AI_KNOWLEDGE_FILE", "", help="Markdown/text files (comma-separated) or a folder: what the bot knows."
    )
    ai_knowledge_max_chars: int = setting(
        "AI_KNOWLEDGE_MAX_CHARS",
        200_000,
        bounds=(1000, 10_000_000),
        help="Most characters AI_KNOWLEDGE_FILE may hold in all (it goes into every prompt).",
    )
    sessions_file: str = setting(
        "SESSIONS_FILE", "", help="TOML file with one table per WAHA session overriding these settings for it."
    )
    llm_daily_budget_usd: float = setting(
        "LLM_DAILY_BUDGET_USD",
        0.0,
        bounds=(0.0, 1_000_000),
        help="Most USD the LLM may cost per day (the provider's figures; 0 = no cap); then FALLBACK_MESSAGE.",
    )
    # Media: voice notes, photos, stickers and PDFs go to the LLM with the text (docs/midia.md).
    media_enabled: bool = setting(
        "MEDIA_ENABLED",
        True,
        help="Download voice notes, images and PDFs and send them to the LLM (false = NON_TEXT_REPLY).",
    )
    media_max_bytes: int = setting(
        "MEDIA_MAX_BYTES",
        10 * 1024 * 1024,
        bounds=(1024, 100 * 1024 * 1024),
        help="The largest file downloaded; a bigger one gets MEDIA_UNAVAILABLE_REPLY (reading stops at the cap).",
    )
    media_store_max_bytes: int = setting(
        "MEDIA_STORE_MAX_BYTES",
        512 * 1024 * 1024,
        bounds=(1024, 2**40),
        help="Most media bytes the store holds at once for replies still waiting.",
    )
    media_download_timeout_seconds: float = setting(
        "MEDIA_DOWNLOAD_TIMEOUT_SECONDS", 30.0, bounds=(0.5, 600), help="Seconds one media download may take."
    )
    media_allowed_origins: tuple[str, ...] = setting(
        "MEDIA_ALLOWED_ORIGINS",
        (),
        help="Origins besides WAHA_BASE_URL's that media may be downloaded from (comma-separated, e.g. an S3 bucket).",
    )
    media_unsupported_reply: str = setting(
        "MEDIA_UNSUPPORTED_REPLY", DEFAULT_MEDIA_UNSUPPORTED_REPLY, help="Sent for media the bot cannot understand."
    )
    media_unavailable_reply: str = setting(
        "MEDIA_UNAVAILABLE_REPLY",
        DEFAULT_MEDIA_UNAVAILABLE_REPLY,
        help="Sent when a file could not be downloaded (expired, too big, refused).",
    )

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
        env = EnvReader(os.environ if environ is None else environ)
        values = {name: env.read(declared) for name, declared in declared_settings().items()}
        if env.environ.get("REPLY_MAX_SENDS", "").strip() == "":
            # Unset: room for our own attempts twice over, so raising REPLY_MAX_ATTEMPTS alone keeps working.
            values["reply_max_sends"] = max(values["reply_max_sends"], 2 * values["reply_max_attempts"])
        settings = cls(**values)
        settings._check(env)
        if env.problems:
            raise SettingsError(
                "Invalid configuration:\n  - "
                + "\n  - ".join(env.problems)
                + "\nSet these as environment variables or in .env.webhook (see .env.webhook.example)."
            )
        return settings

    def _check(self, env: EnvReader) -> None:
        """What no single variable can say: keys that must be real, texts that must not be empty."""
        env.require_real(
            "WAHA_API_KEY",
            self.waha_api_key,
            "the X-Api-Key your WAHA server expects (WAHA_API_KEY in WAHA's own config)",
        )
        if self.uses_openrouter:
            env.require_real("OPENROUTER_API_KEY", self.openrouter_api_key, "your key from https://openrouter.ai/keys")
        if self.reply_max_sends < self.reply_max_attempts:
            env.problems.append(
                f"REPLY_MAX_SENDS ({self.reply_max_sends}) must be at least REPLY_MAX_ATTEMPTS "
                f"({self.reply_max_attempts}): it bounds our retries and WAHA's redeliveries together"
            )
        if not self.fallback_message.strip():
            env.problems.append("FALLBACK_MESSAGE must not be empty: it is sent when the LLM cannot answer")
        if not self.non_text_reply.strip():
            env.problems.append("NON_TEXT_REPLY must not be empty: it is sent for media without a caption")
        env.problems.extend(schedule_problems(self.business_hours, self.business_timezone, self.business_holidays))
        env.problems.extend(knowledge_problems(self.ai_knowledge_file, self.ai_knowledge_max_chars))
        env.problems.extend(sessions_problems(self))
        for name, text in (
            ("MEDIA_UNSUPPORTED_REPLY", self.media_unsupported_reply),
            ("MEDIA_UNAVAILABLE_REPLY", self.media_unavailable_reply),
        ):
            if not text.strip():
                env.problems.append(f"{name} must not be empty: a customer's media always gets an answer")
        for origin in self.media_allowed_origins:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
                env.problems.append(
                    f"MEDIA_ALLOWED_ORIGINS: '{origin}' is not an origin; write scheme://host[:port], e.g. "
                    "https://bucket.s3.amazonaws.com"
                )


@functools.cache
def declared_settings() -> Mapping[str, Setting]:
    """Every field of Settings, in order, with how it is read (its kind filled in from the field's type)."""
    hints = typing.get_type_hints(Settings)
    found: dict[str, Setting] = {}
    for each in fields(Settings):
        declared = each.metadata.get(SETTING_KEY)
        if not isinstance(declared, Setting):
            raise TypeError(f"Settings.{each.name} is not declared with setting(...)")
        kind = declared.kind or KIND_OF_TYPE.get(hints[each.name])
        if kind is None:
            raise TypeError(f"Settings.{each.name}: no kind of setting reads {hints[each.name]}; pass kind=")
        if kind in ("integer", "number") and (declared.minimum is None or declared.maximum is None):
            raise TypeError(f"Settings.{each.name}: {declared.env} needs a minimum and a maximum")
        found[each.name] = replace(declared, kind=kind)
    return MappingProxyType(found)


# Read by gunicorn.conf.py, the start script or the process itself rather than by Settings.
OTHER_VARIABLES = frozenset(
    {
        "WEBHOOK_ENV_FILE",
        "WEBHOOK_SERVER_STARTED_AT",
        "WEBHOOK_STATE_FILE_ID",
        "GUNICORN_WORKERS",
        "GUNICORN_THREADS",
        "GUNICORN_GRACEFUL_TIMEOUT",
        "GUNICORN_ACCESS_LOG",
        "PROMETHEUS_MULTIPROC_DIR",
        "VENV_DIR",
    }
)
# A variable with one of these prefixes is almost surely meant for this server (WAHA_ is not here:
# WAHA's own settings share it).
OUR_PREFIXES = (
    "WEBHOOK_",
    "OPENROUTER_",
    "LLM_",
    "REPLY_",
    "HISTORY_",
    "LOG_",
    "GUNICORN_",
    "RATE_LIMIT",
    "DAILY_",
    "LOOP_",
    "DEBOUNCE",
    "HANDOFF_",
    "TYPING_",
    "STATE_",
    "MAX_",
    "BOT_",
    "BUSINESS_",
    "OUT_OF_HOURS",
    "AI_",
    "SESSIONS_",
)


def setting_names() -> frozenset[str]:
    """Every environment variable this server reads: the Settings declaration, then OTHER_VARIABLES."""
    return frozenset(declared.env for declared in declared_settings().values()) | OTHER_VARIABLES


def unknown_setting_warnings(environ: Mapping[str, str]) -> list[str]:
    """Variables that look like one of ours but are not (a typo the server would silently ignore)."""
    known = setting_names()
    warnings = []
    for name in sorted(environ):
        if name in known:
            continue
        ours = name.startswith(OUR_PREFIXES)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6 if ours else 0.85)
        if close:
            warnings.append(f"{name} is not a setting of this server (ignored); did you mean {close[0]}?")
        elif ours:
            warnings.append(f"{name} is not a setting of this server (ignored); see .env.webhook.example")
    return warnings


def load_settings(env_file: str | None = None) -> Settings:
    """Load `.env.webhook` (never overriding real environment variables), then read settings."""
    from dotenv import load_dotenv

    path = env_file or os.environ.get("WEBHOOK_ENV_FILE") or _find_env_file()
    if path and os.path.isfile(path):
        load_dotenv(path, override=False)
    return Settings.from_env()


def _find_env_file() -> str | None:
    for folder in (os.getcwd(), PROJECT_DIR):
        candidate = os.path.join(folder, DEFAULT_ENV_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STATE_DB",
    "KIND_OF_TYPE",
    "PLACEHOLDER_MARKERS",
    "POSTGRES_SCHEMES",
    "EnvReader",
    "Setting",
    "SettingKind",
    "Settings",
    "SettingsError",
    "declared_settings",
    "is_postgres_url",
    "load_settings",
    "redact_url",
    "setting",
    "setting_names",
    "unknown_setting_warnings",
]
