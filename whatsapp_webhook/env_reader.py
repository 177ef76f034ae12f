"""How one declared setting becomes a value: the setting(...) declaration, the kinds of value, and a
reader of environment variables that collects every problem instead of stopping at the first.
settings.Settings declares its fields with setting(...) and reads them through EnvReader."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

import httpx

T = TypeVar("T")


POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(state_db: str) -> bool:
    """STATE_DB names a PostgreSQL database (postgresql:// or postgres://) rather than an SQLite file."""
    return state_db.strip().lower().startswith(tuple(f"{scheme}://" for scheme in POSTGRES_SCHEMES))


def redact_url(state_db: str) -> str:
    """STATE_DB as it may be printed or logged: a URL's password (and any password= option) becomes ***."""
    if not is_postgres_url(state_db):
        return state_db
    parts = urlsplit(state_db)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# Values copied from .env.webhook.example that still need a real value.
PLACEHOLDER_MARKERS = ("your-key-here", "your-waha-api-key", "change-me")


class SettingsError(ValueError):
    """One or more settings are missing or invalid; the message says which and how to fix them."""


# How a variable's text becomes a value. Most kinds follow from the field's type; url, path and
# choice are asked for by name (or by giving choices).
SettingKind = Literal["text", "optional text", "url", "path", "choice", "integer", "number", "boolean", "id list"]
KIND_OF_TYPE: dict[object, SettingKind] = {
    str: "text",
    str | None: "optional text",  # unset = the default, set but empty = None
    int: "integer",
    float: "number",
    bool: "boolean",
    tuple[str, ...]: "id list",
}
SETTING_KEY = "setting"  # the key of a field's metadata that holds its Setting


@dataclass(frozen=True, kw_only=True)
class Setting:
    """How one field of Settings is read: its variable, what it is for, and what a value must be."""

    env: str
    default: Any  # the field's default too: declared once, in setting(...)
    help: str
    kind: SettingKind | None = None  # None: from the field's type
    minimum: float | None = None  # integer and number: inclusive bounds, both required
    maximum: float | None = None
    choices: tuple[str, ...] = ()  # choice: the accepted values in upper case; any case is read
    lower: bool = False  # choice: keep the value in lower case


def setting(
    env: str,
    default: T,
    *,
    help: str,
    kind: SettingKind | None = None,
    bounds: tuple[float, float] | None = None,
    choices: tuple[str, ...] = (),
    lower: bool = False,
    secret: bool = False,
) -> T:
    """Declare a field of Settings: its default, read from `env` (a secret is kept out of repr)."""
    minimum, maximum = bounds or (None, None)
    declared = Setting(
        env=env,
        default=default,
        help=help,
        kind="choice" if choices else kind,
        minimum=minimum,
        maximum=maximum,
        choices=choices,
        lower=lower,
    )
    return field(default=default, repr=not secret, metadata={SETTING_KEY: declared})


class EnvReader:
    """Typed access to environment variables that collects problems instead of failing on the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def read(self, declared: Setting) -> Any:
        """One setting's value as its declaration says to read it (the default when unset or invalid)."""
        name, default = declared.env, declared.default
        match declared.kind:
            case "text":
                return self.text(name, default)
            case "optional text":
                return self.text_or_none(name, default)
            case "url":
                return self.url(name, default)
            case "path":
                return self.state_path(name, default)
            case "choice":
                return self.choice(name, default, declared.choices, lower=declared.lower)
            case "integer":
                return self._bounded(name, default, int, declared.minimum, declared.maximum, "a whole number")
            case "number":
                return self._bounded(name, default, float, declared.minimum, declared.maximum, "a number")
            case "boolean":
                return self.boolean(name, default)
            case "id list":
                return self.id_list(name, default)
        raise TypeError(f"{name}: no reader for settings of kind {declared.kind!r}")

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def text_or_none(self, name: str, default: str | None) -> str | None:
        """Unset means the default; set and empty means "none" (LOG_FILE= turns the file off)."""
        if name not in self.environ:
            return default
        return self.environ[name].strip() or None

    def state_path(self, name: str, default: str) -> str:
        """A file path (SQLite) or a postgresql:// URL (PostgreSQL). Any other URL, and a folder, is refused
        here rather than becoming a folder named 'x:'. Messages name the scheme only: a URL may hold a password."""
        raw = self.text(name, default)
        if is_postgres_url(raw):
            scheme, rest = raw.split(":", 1)
            raw = scheme.lower() + ":" + rest  # libpq reads the scheme in lower case only
            parts = urlsplit(raw)
            try:
                parts.port  # noqa: B018 - raises ValueError on a port that is not a number
            except ValueError:
                self.problems.append(f"{name} has a port that is not a number: postgresql://user:password@host:5432/db")
                return default
            return raw
        scheme = raw.split(":", 1)[0]
        if "://" in raw or scheme.lower() in (*POSTGRES_SCHEMES, "sqlite", "file"):
            self.problems.append(
                f"{name} must be a file path for the SQLite state file (e.g. data/whatsapp_webhook_state.db) "
                f"or a postgresql:// URL (e.g. postgresql://bot:password@db:5432/bot); a {scheme}: URL is not supported"
            )
            return default
        if os.path.isdir(raw):
            self.problems.append(f"{name} is the folder {raw!r}: point it at a file inside it, e.g. {raw}/state.db")
            return default
        return raw

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

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, lower: bool) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper()
        if value not in choices:
            self.problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value.lower() if lower else value

    def url(self, name: str, default: str) -> str:
        raw = self.text(name, default).rstrip("/")
        parsed = urlparse(raw)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.problems.append(f"{name} must be an http:// or https:// URL, got {raw!r}")
            return default
        try:
            httpx.URL(raw)  # the clients build their URLs from it when a worker starts
        except httpx.InvalidURL as exc:
            self.problems.append(f"{name} is not a usable URL ({exc}); e.g. http://waha:3000")
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
