"""What a customer's media is and how the LLM gets it: kinds, allowed origins, magic numbers, content parts, notes.

Pure functions over plain values (the download itself is media_fetch.py). The rules, from waha.md §15 and
openrouter.md §13:
  * kinds: voice notes and audio (ogg/opus, mp3, m4a/aac, wav), images (jpeg, png, webp, gif), PDFs; any
    other document and video are unsupported;
  * a webhook body never chooses what the server fetches: only files under WAHA's /api/files/ (the request
    carries X-Api-Key) and MEDIA_ALLOWED_ORIGINS; WAHA's default `http://localhost:3000` URLs are rewritten
    to WAHA_BASE_URL;
  * the bytes must look like what the mimetype says (magic numbers);
  * later turns remember a short text stand-in, never the bytes: the model writes it in a [[nota]] block
    that strip_media_note() removes before anything reaches the customer or the log.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import httpx


class MediaKind(StrEnum):
    AUDIO = "audio"
    IMAGE = "image"
    PDF = "pdf"
    UNSUPPORTED = "unsupported"  # other documents, video


# The input modality GET /models must list for a model to be sent each kind (openrouter.md §13).
MODALITY_OF_KIND = {MediaKind.AUDIO: "audio", MediaKind.IMAGE: "image", MediaKind.PDF: "file"}

# Bare mimetype -> (kind, the `format` of an input_audio part, or the mimetype a data URL declares)
_KNOWN_TYPES: dict[str, tuple[MediaKind, str]] = {
    "audio/ogg": (MediaKind.AUDIO, "ogg"),
    "audio/opus": (MediaKind.AUDIO, "ogg"),
    "audio/mpeg": (MediaKind.AUDIO, "mp3"),
    "audio/mp3": (MediaKind.AUDIO, "mp3"),
    "audio/mp4": (MediaKind.AUDIO, "m4a"),
    "audio/m4a": (MediaKind.AUDIO, "m4a"),
    "audio/x-m4a": (MediaKind.AUDIO, "m4a"),
    "audio/aac": (MediaKind.AUDIO, "aac"),
    "audio/wav": (MediaKind.AUDIO, "wav"),
    "audio/x-wav": (MediaKind.AUDIO, "wav"),
    "audio/wave": (MediaKind.AUDIO, "wav"),
    "image/jpeg": (MediaKind.IMAGE, "image/jpeg"),
    "image/jpg": (MediaKind.IMAGE, "image/jpeg"),
    "image/png": (MediaKind.IMAGE, "image/png"),
    "image/webp": (MediaKind.IMAGE, "image/webp"),
    "image/gif": (MediaKind.IMAGE, "image/gif"),
    "application/pdf": (MediaKind.PDF, "application/pdf"),
}


def bare_mimetype(mimetype: str | None) -> str:
    """'audio/ogg; codecs=opus' -> 'audio/ogg' (WhatsApp voice notes carry the codec parameter)."""
    return (mimetype or "").split(";")[0].strip().lower()


def kind_of(mimetype: str | None) -> MediaKind:
    known = _KNOWN_TYPES.get(bare_mimetype(mimetype))
    return known[0] if known else MediaKind.UNSUPPORTED


def worth_downloading(url: str | None, mimetype: str | None) -> bool:
    """Whether accept queues a download job: WAHA has a file, and the bot can use it. A file it cannot use
    (video, documents other than PDF) only gets MEDIA_UNSUPPORTED_REPLY, or a word to the model beside the
    burst's other parts."""
    return url is not None and kind_of(mimetype) is not MediaKind.UNSUPPORTED


def content_type_of(mimetype: str | None) -> str:
    """The format word (audio) or data-URL mimetype (images, PDF) the LLM is told; '' when unsupported."""
    known = _KNOWN_TYPES.get(bare_mimetype(mimetype))
    return known[1] if known else ""


def _is_mp3(data: bytes) -> bool:
    return data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _is_aac(data: bytes) -> bool:
    return len(data) > 1 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0


def _is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


_MAGIC: dict[str, Callable[[bytes], bool]] = {
    "ogg": lambda d: d.startswith(b"OggS"),
    "mp3": _is_mp3,
    "m4a": lambda d: _is_mp4(d) or _is_aac(d),
    "aac": lambda d: _is_aac(d) or _is_mp4(d),
    "wav": lambda d: d.startswith(b"RIFF") and d[8:12] == b"WAVE",
    "image/jpeg": lambda d: d.startswith(b"\xff\xd8\xff"),
    "image/png": lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/webp": lambda d: d.startswith(b"RIFF") and d[8:12] == b"WEBP",
    "image/gif": lambda d: d.startswith((b"GIF87a", b"GIF89a")),
    "application/pdf": lambda d: d.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n\x0c").startswith(b"%PDF-"),
}


def matches_mimetype(data: bytes, mimetype: str | None) -> bool:
    """Whether the bytes start the way files of the declared type do (a PDF may start with a BOM or blanks)."""
    check = _MAGIC.get(content_type_of(mimetype))
    return bool(check and check(data))


_KIND_WORDS = {MediaKind.AUDIO: "voice notes and audio", MediaKind.IMAGE: "images and stickers", MediaKind.PDF: "PDFs"}


def media_summary(modalities: frozenset[str] | tuple[str, ...] | None, *, model: str) -> str:
    """Which customers' files the model will understand, from its GET /models input_modalities (None: unknown)."""
    if modalities is None or not modalities:
        return f"{model}: the LLM server does not list its input kinds; voice notes, images and PDFs will be tried"
    taken = [words for kind, words in _KIND_WORDS.items() if MODALITY_OF_KIND[kind] in modalities]
    refused = [words for kind, words in _KIND_WORDS.items() if MODALITY_OF_KIND[kind] not in modalities]
    line = f"{model} understands " + (", ".join(taken) if taken else "no media")
    if refused:
        line += "; " + ", ".join(refused) + " get MEDIA_UNSUPPORTED_REPLY"
    return line + " (video and other documents always do)"


# --- where media may come from ------------------------------------------------------------------------

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class OriginVerdict(StrEnum):
    WAHA = "waha"  # WAHA's own origin: the request carries X-Api-Key
    ALLOWED = "allowed"  # one of MEDIA_ALLOWED_ORIGINS (e.g. a pre-signed S3 URL): no WAHA key sent
    REFUSED = "refused"


@dataclass(frozen=True, kw_only=True)
class MediaSource:
    verdict: OriginVerdict
    url: str | None  # what to fetch; None when refused

    @property
    def sends_api_key(self) -> bool:
        return self.verdict is OriginVerdict.WAHA


def origin_of(url: str) -> str:
    """scheme://host[:port], lower case, with the scheme's default port left out."""
    parts = urlsplit(url)
    scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    shown_host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown_host}" + (f":{port}" if port and port != default else "")


WAHA_FILES_PATH = "/api/files/"  # the only WAHA path a media.url may name: WAHA's key opens every other endpoint
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)  # an encoded '.', '/' or '\\'


def _waha_file_url(base: SplitResult, path: str) -> str | None:
    """WAHA_BASE_URL (its path prefix kept) joined with a path under /api/files/, or None when the path could
    name anything else: dot segments, encoded separators or dots, backslashes. The query is dropped (WAHA's
    file URLs have none), and the path httpx will really send (it resolves '..') is checked again."""
    if not path.startswith(WAHA_FILES_PATH) or "\\" in path or _ENCODED_SEPARATOR.search(path):
        return None
    if any(segment in ("", ".", "..") for segment in path[len(WAHA_FILES_PATH) :].split("/")):
        return None
    wanted = base.path.rstrip("/") + path
    url = urlunsplit((base.scheme, base.netloc, wanted, "", ""))
    try:
        sent = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    if sent.path != unquote(wanted) or not sent.path.startswith(base.path.rstrip("/") + WAHA_FILES_PATH):
        return None
    return url


def media_source(url: str, *, waha_base_url: str, allowed_origins: tuple[str, ...] = ()) -> MediaSource:
    """Where a media.url may be fetched from, decided by the server's settings and never by the webhook body.

    WAHA builds media.url from its own WAHA_BASE_URL, `http://localhost:3000` unless set: a loopback host
    is WAHA talking about itself, so the path is fetched from WAHA_BASE_URL (with its path prefix, if any).
    Any other origin must be WAHA's or one listed in MEDIA_ALLOWED_ORIGINS; the rest is refused before any
    connection. On WAHA's origin the request carries X-Api-Key, so only a file under /api/files/ may be
    named there (never /api/screenshot, /api/sessions, ...).
    """
    refused = MediaSource(verdict=OriginVerdict.REFUSED, url=None)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return refused
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return refused
    if any(ch in url for ch in "\r\n\t\\ ") or not url.isprintable():
        return refused
    base = urlsplit(waha_base_url)
    prefix = base.path.rstrip("/")
    on_waha = origin_of(url) == origin_of(waha_base_url)
    if on_waha or parts.hostname.lower() in LOOPBACK_HOSTS:
        path = parts.path
        if prefix and path.startswith(prefix + WAHA_FILES_PATH):
            path = path[len(prefix) :]
        elif on_waha and prefix:
            return refused  # WAHA's own URLs carry its prefix
        waha_url = _waha_file_url(base, path)
        return refused if waha_url is None else MediaSource(verdict=OriginVerdict.WAHA, url=waha_url)
    if origin_of(url) in {origin_of(o) for o in allowed_origins}:
        return MediaSource(verdict=OriginVerdict.ALLOWED, url=urlunsplit(parts._replace(fragment="")))
    return refused


# --- what the LLM is sent -------------------------------------------------------------------------------

_SAFE_FILENAME = re.compile(r"[^\w.\- ()]+", re.UNICODE)


def safe_filename(filename: str | None, *, default: str = "documento.pdf") -> str:
    cleaned = _SAFE_FILENAME.sub("_", filename or "").strip(" ._")[:100]
    return cleaned or default


def content_part(kind: MediaKind, *, mimetype: str, data: bytes, filename: str | None = None) -> dict[str, Any]:
    """One content part of a chat-completions user message (openrouter.md §13)."""
    encoded = base64.b64encode(data).decode("ascii")
    declared = content_type_of(mimetype)
    if kind is MediaKind.AUDIO:
        return {"type": "input_audio", "input_audio": {"data": encoded, "format": declared}}
    if kind is MediaKind.IMAGE:
        return {"type": "image_url", "image_url": {"url": f"data:{declared};base64,{encoded}"}}
    if kind is MediaKind.PDF:
        return {
            "type": "file",
            "file": {"filename": safe_filename(filename), "file_data": f"data:{declared};base64,{encoded}"},
        }
    raise ValueError(f"no content part for {kind} media")


# The fixed stand-ins kept in the history when the model gave no note (and in the user turn before it).
STAND_IN = {
    MediaKind.AUDIO: "[áudio]",
    MediaKind.IMAGE: "[imagem]",
    MediaKind.PDF: "[documento]",
    MediaKind.UNSUPPORTED: "[arquivo]",
}

NOTE_INSTRUCTION = (
    "The customer's message includes audio, images or documents, in the order they were sent. Answer the "
    "customer as usual. Then, on a last line of its own, write [[nota]] followed by a transcript of each audio "
    "(word for word) or a one-sentence description of each image or document, then [[/nota]]. That line is "
    "only for your memory: it is removed before the customer sees the answer. A part in square brackets, "
    "such as [o cliente enviou um vídeo, que não consigo ver], stands for a file you cannot see or hear: "
    "answer the rest, and say briefly that you could not open that file."
)

NOTE_MAX_CHARS = 600
_NOTE_OPEN = re.compile(r"\[\[\s*nota\s*\]\]", re.IGNORECASE)
_NOTE_CLOSE = re.compile(r"\[\[\s*/\s*nota\s*\]\]", re.IGNORECASE)
_NOTE_TAG = re.compile(r"\[\[\s*/?\s*nota\s*\]\]", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, kw_only=True)
class NotedReply:
    text: str  # what may be sent: no note, no note marker
    note: str | None  # the model's transcript/description, for the history only


def _without_note_tags(text: str, *, passes: int = 8) -> str:
    """Stray tags removed until none is left: removing one can join its neighbours into a new one
    ("[[[[/nota]]nota]]" -> "[[nota]]"). Past a few passes (only a reply built to defeat this gets there)
    the brackets themselves go, which no tag survives, so the work stays linear in the reply's length."""
    for _ in range(passes):
        stripped = _NOTE_TAG.sub("", text)
        if stripped == text:
            return text
        text = stripped
    return text.replace("[", "(").replace("]", ")") if _NOTE_TAG.search(text) else text


def strip_media_note(reply: str) -> NotedReply:
    """Split the model's reply into what the customer gets and the note it wrote for later turns.

    Everything from an opening [[nota]] to its closing tag (or to the end, when it is never closed) goes,
    and so does any stray tag: a malformed note can lose the note, never leak it.
    """
    note_parts: list[str] = []
    kept: list[str] = []
    rest = reply
    while (opening := _NOTE_OPEN.search(rest)) is not None:
        kept.append(rest[: opening.start()])
        after = rest[opening.end() :]
        closing = _NOTE_CLOSE.search(after)
        note_parts.append(after[: closing.start()] if closing else after)
        rest = after[closing.end() :] if closing else ""
    kept.append(rest)
    text = _without_note_tags("".join(kept)).strip()
    note = " ".join(_CONTROL.sub(" ", _NOTE_TAG.sub("", " ".join(note_parts))).split())[:NOTE_MAX_CHARS]
    return NotedReply(text=text, note=note or None)
