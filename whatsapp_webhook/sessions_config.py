"""SESSIONS_FILE: one configuration per WhatsApp number (WAHA session), in TOML.

    [default]
    ai_system_prompt = "Você é a atendente da Padaria Pão Quente."
    ai_knowledge_file = "conhecimento/padaria.md"

    [loja2]
    business_hours = "seg-sab 09:00-19:00"
    openrouter_model = "google/gemini-3.5-flash"
    enabled = true

Each table's name is a WAHA session's; its keys are the lower-case names of the settings it overrides
(SESSION_KEYS), plus `enabled`. A session that is not in the file uses the global settings. An unknown key or
a wrong value stops start-up (sessions_problems); the file is re-read when it changes (SessionsFile), and a
broken edit keeps the last good configuration. Relative knowledge paths are relative to the file's folder."""

from __future__ import annotations

import difflib
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.hours import OUT_OF_HOURS_MODES, schedule_problems
from whatsapp_webhook.knowledge import knowledge_problems

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings

log = logging.getLogger("whatsapp_webhook")

CHECK_SECONDS = 1.0

# The settings a session may override, and the kind of TOML value each takes.
SESSION_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "ai_system_prompt": "text",
        "ai_knowledge_file": "paths",
        "business_hours": "text",
        "business_timezone": "text",
        "business_holidays": "list",
        "out_of_hours_mode": "mode",
        "out_of_hours_notice": "text",
        "openrouter_model": "text",
        "openrouter_fallback_models": "models",
        "fallback_message": "text",
        "reply_in_groups": "boolean",
        "llm_daily_budget_usd": "money",
        "enabled": "boolean",
    }
)


class SessionsFileError(ValueError):
    """SESSIONS_FILE cannot be used; `problems` lists every problem, each naming the session and the key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class SessionOverrides:
    """One table of SESSIONS_FILE: the values (already converted to the Settings field's type) it sets."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class SessionsConfig:
    path: str = ""
    sessions: Mapping[str, SessionOverrides] = field(default_factory=dict)

    def overrides(self, session: str) -> SessionOverrides | None:
        return self.sessions.get(session)


def _convert(session: str, key: str, value: Any, folder: str) -> Any:
    """The TOML value as the Settings field holds it; ValueError saying what was expected."""
    kind = SESSION_KEYS[key]
    where = f"[{session}] {key}"
    if kind in ("text", "paths", "mode"):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a text in quotes, got {value!r}")
        if kind == "mode" and value.strip().upper() not in OUT_OF_HOURS_MODES:
            raise ValueError(f"{where} must be one of answer, notice, silent, got {value!r}")
        if kind == "mode":
            return value.strip().lower()
        if kind == "paths":
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return ",".join(p if os.path.isabs(p) else os.path.normpath(os.path.join(folder, p)) for p in parts)
        return value
    if kind == "list":  # holidays: a text or a list of texts
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ", ".join(value)
        if isinstance(value, str):
            return value
        raise ValueError(f'{where} must be a list of ISO dates, e.g. ["2026-12-25"], got {value!r}')
    if kind == "models":
        items = value if isinstance(value, list) else value.split(",") if isinstance(value, str) else None
        if items is None or not all(isinstance(v, str) and " " not in v.strip() for v in items):
            raise ValueError(f'{where} must be a list of model ids, e.g. ["google/gemini-3.5-flash"], got {value!r}')
        return tuple(dict.fromkeys(v.strip() for v in items if v.strip() and v.strip().lower() != "none"))
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false (without quotes), got {value!r}")
        return value
    if kind == "money":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1_000_000:
            raise ValueError(f"{where} must be a number of dollars from 0 to 1000000 (0 = no cap), got {value!r}")
        return float(value)
    raise AssertionError(kind)


def parse_sessions(text: str, *, path: str) -> SessionsConfig:
    """The file's tables, validated; SessionsFileError listing every problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SessionsFileError([f"SESSIONS_FILE {path!r} is not valid TOML: {exc}"]) from None
    problems: list[str] = []
    sessions: dict[str, SessionOverrides] = {}
    folder = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    for name, table in document.items():
        if not isinstance(table, dict):
            problems.append(f"SESSIONS_FILE: {name} = ... is outside any table; put it under a [session] line")
            continue
        values: dict[str, Any] = {}
        enabled = True
        for key, value in table.items():
            if key not in SESSION_KEYS:
                close = difflib.get_close_matches(key, SESSION_KEYS, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; the keys are {', '.join(SESSION_KEYS)}"
                problems.append(f"SESSIONS_FILE: [{name}] has an unknown key {key!r}{hint}")
                continue
            try:
                converted = _convert(name, key, value, folder)
            except ValueError as exc:
                problems.append(f"SESSIONS_FILE: {exc}")
                continue
            if key == "enabled":
                enabled = converted
            else:
                values[key] = converted
        sessions[name] = SessionOverrides(name=name, values=MappingProxyType(values), enabled=enabled)
    if problems:
        raise SessionsFileError(problems)
    return SessionsConfig(path=path, sessions=MappingProxyType(sessions))


def read_sessions_file(path: str) -> SessionsConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise SessionsFileError([f"SESSIONS_FILE {path!r} cannot be read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise SessionsFileError([f"SESSIONS_FILE {path!r} is not UTF-8 text"]) from None
    return parse_sessions(text, path=path)


def effective_settings(settings: Settings, overrides: SessionOverrides | None) -> Settings:
    """The global settings with one session's overrides applied."""
    return replace(settings, **overrides.values) if overrides else settings


def session_value_problems(session: str, settings: Settings) -> list[str]:
    """What the hours and knowledge checks say about one session's effective settings."""
    found = schedule_problems(settings.business_hours, settings.business_timezone, settings.business_holidays)
    found += knowledge_problems(settings.ai_knowledge_file, settings.ai_knowledge_max_chars)
    if not settings.fallback_message.strip():
        found.append("FALLBACK_MESSAGE must not be empty")
    return [f"SESSIONS_FILE: [{session}] {problem}" for problem in found]


def sessions_problems(settings: Settings) -> list[str]:
    """Start-up problems of SESSIONS_FILE: the file itself, then each session's effective values."""
    if not settings.sessions_file:
        return []
    try:
        config = read_sessions_file(settings.sessions_file)
    except SessionsFileError as exc:
        return exc.problems
    problems = []
    for name, overrides in config.sessions.items():
        problems += session_value_problems(name, effective_settings(settings, overrides))
    return problems


# How long SESSIONS_FILE must stay empty before that counts as "no sessions" (an editor rewriting it takes far less).
EMPTY_FILE_SECONDS = 1.0


class SessionsFile:
    """SESSIONS_FILE as it is now: re-read when its modification time or size changes (looked at once a
    second at most); an edit that breaks it keeps the last good configuration and is logged once, and a file
    found empty mid-write is not taken for a configuration without sessions."""

    def __init__(
        self, path: str, *, clock: Callable[[], float] = time.monotonic, check_seconds: float | None = None
    ) -> None:
        self.path, self.clock = path, clock
        self.check_seconds = CHECK_SECONDS if check_seconds is None else check_seconds
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._signature: tuple[int, int] | None = None
        self._empty_since: float | None = None  # when the file was first found empty (not applied yet)
        self._config = SessionsConfig(path=path)
        self.version = 0

    def current(self) -> SessionsConfig:
        if not self.path:
            return self._config
        now = self.clock()
        with self._lock:
            if now - self._checked_at < self.check_seconds:
                return self._config
            self._checked_at = now
            try:
                info = os.stat(self.path)
                signature = (info.st_mtime_ns, info.st_size)
            except OSError:
                signature = (-1, -1)
            if signature == self._signature:
                return self._config
            if signature[1] == 0 and self._config.sessions:
                # Editors and `>` truncate the file, then write it: read in between, it would be a configuration
                # with no sessions, and every number would get the global profile until the next look. An
                # empty file is applied only once it has stayed empty for EMPTY_FILE_SECONDS.
                if self._empty_since is None:
                    self._empty_since = now
                if now - self._empty_since < EMPTY_FILE_SECONDS:
                    return self._config
            self._empty_since = None
            self._signature = signature
            try:
                config = read_sessions_file(self.path)
            except SessionsFileError as exc:
                log.error("%s; the sessions keep the configuration they had", exc)
                return self._config
            if self.version:
                log.info("SESSIONS_FILE changed: sessions %s", ", ".join(sorted(config.sessions)) or "(none)")
            self._config = config
            self.version += 1
            return self._config


def reply_in_groups_for(settings: Settings, sessions: SessionsFile, session: str | None) -> bool:
    """REPLY_IN_GROUPS for a message's session (the webhook decides it before the message is recorded)."""
    if not settings.sessions_file:
        return settings.reply_in_groups
    overrides = sessions.current().overrides(session or "default")
    value = overrides.values.get("reply_in_groups") if overrides else None
    return settings.reply_in_groups if value is None else bool(value)
