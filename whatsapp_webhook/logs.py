"""Logging: the server's one logger, text or JSON lines, and a log file that several gunicorn workers rotate safely."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.settings import SettingsError

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings


log = logging.getLogger("whatsapp_webhook")

# Log lines carry their fields as data: the message's own context (event, chat, ...) bound with
# MessageLog, and a line's fields as a dict of named %-placeholders:
#     message_log.info("decision=%(decision)s attempt=%(attempt)d", {"decision": "working", "attempt": 2})
# The text format renders them where the placeholders are, as it always did; the JSON format puts
# them in the document as fields and never reads the message text. Every value is escaped, so no
# value (a chat id, an event id, a header) can start a new line or pass for another field.
CONTEXT_ATTRIBUTE = "log_context"
_PLAIN_VALUE = re.compile(r"[^\s=\"\\\x00-\x1f\x7f-\x9f\u2028\u2029]*")
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\\"]")


def _escape_character(match: re.Match[str]) -> str:
    character = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}.get(character, f"\\u{ord(character):04x}")


# A customer's voice note or photo must never end up in a log, not even echoed in an upstream's error (cut to
# 200 characters) or an exception: any run this long of the base64 alphabet is left out. Ids, hashes and
# paths the server logs are shorter or broken up by '_', '-', '@', ':' or '.'.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")


def without_base64(text: str) -> str:
    return _BASE64_RUN.sub(lambda m: f"<{len(m.group())} base64 characters left out>", text)


def log_value(value: object) -> str:
    """A value as it appears in a text line: as is when plain, else quoted with control characters escaped
    (newlines, U+0085, U+2028, ANSI escapes), so it can never break the line or look like `key=value`."""
    text = "-" if value is None else str(value)
    if text and _PLAIN_VALUE.fullmatch(text):
        return text
    return '"' + _UNSAFE_CHARACTER.sub(_escape_character, text) + '"'


def _escaped_args(args: Any) -> Any:
    if isinstance(args, dict):
        return {key: log_value(value) if isinstance(value, str) else value for key, value in args.items()}
    if isinstance(args, tuple):
        return tuple(log_value(value) if isinstance(value, str) else value for value in args)
    return args


class MessageLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only in typeshed
    """The server's logger bound to one message's context (event, chat, request): each line carries it."""

    def __init__(self, logger: logging.Logger | MessageLog = log, **context: object) -> None:
        inherited = dict(logger.extra or {}) if isinstance(logger, MessageLog) else {}
        base = logger.logger if isinstance(logger, MessageLog) else logger
        super().__init__(base, {**inherited, **context})

    def bind(self, **context: object) -> MessageLog:
        return MessageLog(self, **context)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**kwargs.get("extra", {}), CONTEXT_ATTRIBUTE: dict(self.extra or {})}
        return msg, kwargs


def rendered_message(record: logging.LogRecord) -> str:
    """The line as people read it: the bound context, then the message with its values escaped."""
    context: dict[str, object] = getattr(record, CONTEXT_ATTRIBUTE, {})
    message = str(record.msg)
    args = _escaped_args(record.args)
    if args:
        try:
            message = message % args
        except (TypeError, ValueError, KeyError):
            message = f"{message} {args!r}"
    message = _UNSAFE_CHARACTER.sub(lambda m: m.group() if m.group() in '"\\' else _escape_character(m), message)
    message = without_base64(message)
    prefix = " ".join(f"{name}={log_value(value)}" for name, value in context.items())
    return f"{prefix} {message}" if prefix and message else prefix or message


class TextLogFormatter(logging.Formatter):
    """`time LEVEL [pid N] logger: event=... chat=... message`, one line per record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = rendered_message(record)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        """The whole line, the bound context and a traceback included, without base64."""
        return without_base64(super().format(record))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; the bound context and the line's named values are its fields.

    Fields come from the record's attributes, never from parsing the message text.
    """

    BASE = ("time", "level", "pid", "logger", "message", "exception")

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": rendered_message(record),
        }
        fields = {**getattr(record, CONTEXT_ATTRIBUTE, {}), **(record.args if isinstance(record.args, dict) else {})}
        for name, value in fields.items():
            if name not in self.BASE:
                plain = isinstance(value, (int, float, bool)) or value is None
                document[name] = value if plain else without_base64(str(value))
        if record.exc_info:
            document["exception"] = without_base64(self.formatException(record.exc_info))
        # json.dumps leaves U+2028/U+2029/U+0085 raw, and Python's splitlines() splits on them.
        return json.dumps(document, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


_JSON_LINE_BREAKS = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}


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
    formatter: logging.Formatter = JsonLogFormatter() if settings.log_format == "json" else TextLogFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file:
        try:
            handlers.append(
                SharedRotatingFileHandler(
                    settings.log_file, max_bytes=settings.log_max_bytes, backup_count=settings.log_backup_count
                )
            )
        except OSError as exc:
            raise SettingsError(
                f"LOG_FILE {settings.log_file!r} cannot be opened ({exc}); "
                "point LOG_FILE at a writable path or set it empty to log to the console only"
            ) from None
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(settings.log_level)
    log.propagate = False
