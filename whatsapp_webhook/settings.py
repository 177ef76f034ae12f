"""Typed settings: every knob of the server, read once from the environment and .env.webhook, validated
with a message that says how to fix each problem."""

from __future__ import annotations

import difflib
import os
from collections.abc import (
    Callable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")


# The folder of whatsapp_webhook_server.py: the default state file and .env.webhook live beside it.
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEFAULT_SYSTEM_PROMPT = (
    "You are the WhatsApp assistant of a business. Answer the customer's message "
    "helpfully, politely and briefly, in the same language the customer wrote in. "
    "Write plain text suitable for WhatsApp: short paragraphs, no Markdown tables or "
    "headings. If you do not know something about the business, say so honestly and "
    "offer to pass the question to a human."
)


DEFAULT_FALLBACK_MESSAGE = "Desculpe, não consegui responder agora. Por favor, tente novamente em alguns minutos."


DEFAULT_NON_TEXT_REPLY = "Por enquanto eu só entendo mensagens de texto. Pode me escrever sua pergunta?"


DEFAULT_RESET_REPLY = "Pronto! Comecei uma conversa nova. Como posso ajudar?"


DEFAULT_STOP_REPLY = (
    "Tudo bem, não vou mais responder automaticamente. Se quiser voltar a falar com o assistente, envie VOLTAR."
)


DEFAULT_START_REPLY = "Que bom ter você de volta! Como posso ajudar?"


DEFAULT_RATE_LIMIT_REPLY = (
    "Recebi muitas mensagens em pouco tempo. Vou pausar as respostas por alguns instantes; tente de novo em breve."
)


# Served on OpenRouter as of 2026-12 (../shared/reference/openrouter.md §9); `--check` verifies them
# against GET /models, because ids are retired every few months.
DEFAULT_MODEL = "google/gemini-3.1-flash-lite"


DEFAULT_FALLBACK_MODELS = ("google/gemini-3.5-flash",)


REASONING_EFFORTS = ("NONE", "MINIMAL", "LOW", "MEDIUM", "HIGH")


DEFAULT_STATE_DB = os.path.join(PROJECT_DIR, "data", "whatsapp_webhook_state.db")


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
        settings = cls._read(env)
        if env.problems:
            raise SettingsError(
                "Invalid configuration:\n  - "
                + "\n  - ".join(env.problems)
                + "\nSet these as environment variables or in .env.webhook (see .env.webhook.example)."
            )
        return settings

    @classmethod
    def _read(cls, env: _EnvReader) -> Settings:
        """Every variable, read through `env`, which collects the problems (and the names asked for)."""
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
            state_db=env.state_path("STATE_DB", DEFAULT_STATE_DB),
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
        env.require_real(
            "WAHA_API_KEY",
            settings.waha_api_key,
            "the X-Api-Key your WAHA server expects (WAHA_API_KEY in WAHA's own config)",
        )
        if settings.uses_openrouter:
            env.require_real(
                "OPENROUTER_API_KEY", settings.openrouter_api_key, "your key from https://openrouter.ai/keys"
            )
        if not settings.fallback_message.strip():
            env.problems.append("FALLBACK_MESSAGE must not be empty: it is sent when the LLM cannot answer")
        if not settings.non_text_reply.strip():
            env.problems.append("NON_TEXT_REPLY must not be empty: it is sent for media without a caption")
        return settings


class _EnvReader:
    """Typed access to environment variables that collects problems instead of failing on the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        self.names: set[str] = set()  # every variable asked for: the settings this server knows

    def _raw(self, name: str) -> str | None:
        self.names.add(name)
        value = self.environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def state_path(self, name: str, default: str) -> str:
        """A file path for SQLite; a URL or a folder is refused here rather than becoming a folder named 'x:'."""
        raw = self.text(name, default)
        if "://" in raw or raw.lower().startswith(("postgres:", "postgresql:", "sqlite:", "file:")):
            scheme = raw.split(":", 1)[0]
            self.problems.append(
                f"{name} must be a file path for the SQLite state file (e.g. data/whatsapp_webhook_state.db); "
                f"a {scheme}: URL is not supported by this version"
            )
            return default
        if os.path.isdir(raw):
            self.problems.append(f"{name} is the folder {raw!r}: point it at a file inside it, e.g. {raw}/state.db")
            return default
        return raw

    def text_allowing_empty(self, name: str, default: str) -> str:
        """Like text(), but a variable that is set and empty means "none" rather than "default"."""
        self.names.add(name)
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
            value: T | None = parse(raw)
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
        """Comma-separated ids; blank means the default and `none` means no ids. Repeats are dropped."""
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() == "none":
            return ()
        ids = [part.strip() for part in raw.split(",")]
        if any(" " in i for i in ids):
            self.problems.append(f"{name} must be model ids separated by commas (or none), got {raw!r}")
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


# Read by gunicorn.conf.py, the start script or the process itself rather than by Settings.
OTHER_VARIABLES = frozenset(
    {
        "WEBHOOK_ENV_FILE",
        "WEBHOOK_SERVER_STARTED_AT",
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
)


def setting_names() -> frozenset[str]:
    """Every environment variable this server reads."""
    reader = _EnvReader({})
    Settings._read(reader)
    return frozenset(reader.names) | OTHER_VARIABLES


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
