"""The business's knowledge: AI_KNOWLEDGE_FILE (Markdown/text files, comma-separated, or a folder of them) read
into the system prompt, reloaded when a file changes, never more than AI_KNOWLEDGE_MAX_CHARS.

A few thousand FAQ lines fit in any current model's context, so the whole text goes into the prompt (no vector
database). The files are looked at (os.stat) at most once per CHECK_SECONDS per worker: an unchanged file costs
nothing per message, an edited one takes effect on the next message after that."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KNOWLEDGE_SUFFIXES = (".md", ".markdown", ".txt")
CHECK_SECONDS = 1.0

# Put after the system prompt, before the files: the model must answer from them and say when it cannot.
KNOWLEDGE_INSTRUCTION = (
    "Below, between <knowledge> and </knowledge>, is the business's own reference: products, prices, "
    "address, delivery, policies, frequently asked questions. Answer questions about the business only from it. "
    "If the answer is not there, say honestly that you do not know and offer to pass the question to a person "
    "of the team; never invent prices, products, dates or policies."
)

log = logging.getLogger("whatsapp_webhook")


class KnowledgeError(ValueError):
    """AI_KNOWLEDGE_FILE cannot be used as it is; the message names the file and says how to fix it."""


@dataclass(frozen=True, kw_only=True)
class KnowledgeFile:
    path: str
    text: str


def knowledge_paths(spec: str) -> list[str]:
    """The files AI_KNOWLEDGE_FILE names, in order: each listed file, and a folder's .md/.txt files by name."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(part)
                for name in names
                if name.lower().endswith(KNOWLEDGE_SUFFIXES) and not name.startswith(".")
            )
            if not found:
                raise KnowledgeError(f"AI_KNOWLEDGE_FILE: the folder {part!r} holds no .md or .txt file")
            paths.extend(found)
        else:
            paths.append(part)
    return list(dict.fromkeys(paths))


def read_knowledge(spec: str, max_chars: int) -> list[KnowledgeFile]:
    """Every file's text; KnowledgeError when one is missing, not UTF-8, or all together exceed max_chars."""
    files = []
    for path in knowledge_paths(spec):
        try:
            with open(path, encoding="utf-8") as handle:
                files.append(KnowledgeFile(path=path, text=handle.read().strip()))
        except FileNotFoundError:
            raise KnowledgeError(f"AI_KNOWLEDGE_FILE: {path!r} does not exist") from None
        except UnicodeDecodeError:
            raise KnowledgeError(f"AI_KNOWLEDGE_FILE: {path!r} is not UTF-8 text: save it as UTF-8") from None
        except OSError as exc:
            raise KnowledgeError(f"AI_KNOWLEDGE_FILE: {path!r} cannot be read ({exc.strerror})") from None
    total = sum(len(f.text) for f in files)
    if total > max_chars:
        largest = max(files, key=lambda f: len(f.text))
        together = f" ({len(files)} files, {total:,} characters together)" if len(files) > 1 else ""
        raise KnowledgeError(
            f"AI_KNOWLEDGE_FILE: {largest.path!r} has {len(largest.text):,} characters{together}, over "
            f"AI_KNOWLEDGE_MAX_CHARS={max_chars:,}: shorten it or raise AI_KNOWLEDGE_MAX_CHARS"
        )
    return files


def knowledge_problems(spec: str, max_chars: int) -> list[str]:
    """Start-up problems of AI_KNOWLEDGE_FILE (none when it is not set)."""
    if not spec.strip():
        return []
    try:
        read_knowledge(spec, max_chars)
    except KnowledgeError as exc:
        return [str(exc)]
    return []


def knowledge_section(files: list[KnowledgeFile]) -> str:
    """The instruction and the files, as they follow the system prompt (empty when there are none)."""
    if not files:
        return ""
    body = "\n\n".join(f"# {os.path.basename(f.path)}\n{f.text}" if len(files) > 1 else f.text for f in files if f.text)
    return f"{KNOWLEDGE_INSTRUCTION}\n\n<knowledge>\n{body}\n</knowledge>"


class KnowledgeBase:
    """AI_KNOWLEDGE_FILE as it is now: re-read only when a file's size or modification time changed.

    A change that breaks it (a file removed, grown past the limit) keeps the last good text and logs
    the problem once per change, so a half-saved edit never leaves customers without answers."""

    def __init__(
        self,
        spec: str,
        max_chars: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_seconds: float | None = None,
    ) -> None:
        self.spec, self.max_chars, self.clock = spec, max_chars, clock
        self.check_seconds = CHECK_SECONDS if check_seconds is None else check_seconds
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._section = ""
        self.version = 0  # bumped on every reload that changed the text
        self.loads = 0  # times the files were actually read

    @property
    def enabled(self) -> bool:
        return bool(self.spec.strip())

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        try:
            paths = knowledge_paths(self.spec)
        except KnowledgeError:
            return (("", -1, -1),)
        for path in paths:
            try:
                info = os.stat(path)
                found.append((path, info.st_mtime_ns, info.st_size))
            except OSError:
                found.append((path, -1, -1))
        return tuple(found)

    def section(self) -> str:
        """The knowledge part of the system prompt; cheap while the files stay as they are."""
        if not self.enabled:
            return ""
        now = self.clock()
        with self._lock:
            if now - self._checked_at < self.check_seconds:
                return self._section
            self._checked_at = now
            signature = self._current_signature()
            if signature == self._signature:
                return self._section
            self._signature = signature
            try:
                files = read_knowledge(self.spec, self.max_chars)
            except KnowledgeError as exc:
                log.error("%s; the bot keeps the knowledge it had", exc)
                return self._section
            self.loads += 1
            section = knowledge_section(files)
            if section != self._section:
                if self.version:
                    log.info("AI_KNOWLEDGE_FILE changed: the next replies use the new text (%d chars)", len(section))
                self._section = section
                self.version += 1
            return self._section
