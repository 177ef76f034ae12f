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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; the message's key=value pairs (event, chat, decision...) become fields."""

    FIELD = re.compile(r"(\w+)=(\S+)")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": message,
        }
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
    formatter: logging.Formatter = (
        JsonLogFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")
    )
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
