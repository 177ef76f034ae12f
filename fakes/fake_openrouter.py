"""FakeOpenRouter: OpenAI-compatible /chat/completions that echoes the last user message, plus scripted failures."""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fakes.base import FakeServer, FaultRule, Request, Response, run_cli

# status -> (message, error_type) as documented on OpenRouter's errors page.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("Invalid request", "invalid_request"), 401: ("No auth credentials found", "authentication"),
    402: ("Insufficient credits", "payment_required"), 403: ("Flagged by moderation", "permission_denied"),
    404: ("Model not found", "not_found"), 408: ("Request timed out", "timeout"),
    429: ("Rate limit exceeded", "rate_limit_exceeded"), 500: ("Internal Server Error", "server"),
    502: ("Provider returned error", "provider_unavailable"), 503: ("No available providers", "provider_overloaded"),
    504: ("Provider timed out", "timeout"),
}
# What OpenRouter serves today (openrouter.md §9), with the input kinds GET /models reports for each.
CURRENT_MODELS: dict[str, tuple[str, ...]] = {
    "google/gemini-3.1-flash-lite": ("text", "image", "audio", "file", "video"),
    "google/gemini-3.5-flash": ("text", "image", "audio", "file", "video"),
}
# Ids OpenRouter still knows but no provider serves any more: it answers 404 "No endpoints found".
RETIRED_MODELS = ("google/gemini-2.0-flash-001", "google/gemini-2.5-flash", "google/gemini-2.5-flash-lite")
PROVIDER_ERROR = {"code": 502, "message": "Provider returned error",
                  "metadata": {"provider_name": "Google", "raw": '{"error":{"code":503,"status":"UNAVAILABLE"}}'}}


MEDIA_DIR = Path(__file__).resolve().parent / "data" / "media"
# What the fake model "hears" or "sees" in each committed file (fakes/make_media.py made them).
MEDIA_CATALOG = {
    "voice_note.ogg": "qual o horário de vocês?",
    "product.jpg": "foto de um produto vermelho e azul com um círculo branco",
    "sticker.webp": "figurinha de um rosto amarelo sorrindo",
    "boleto.pdf": "boleto de R$ 123,45 com vencimento em 10/12/2026",
    "voice_note_long.ogg": "qual é o horário de vocês no sábado e vocês entregam em Campinas?",
}
AUDIO_FORMATS = {"wav", "mp3", "aiff", "aac", "ogg", "flac", "m4a", "pcm16", "pcm24"}  # openrouter.md §13
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif"}
MAGIC = {"ogg": b"OggS", "mp3": b"ID3", "wav": b"RIFF", "image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8\xff",
         "image/webp": b"RIFF", "image/gif": b"GIF8", "application/pdf": b"%PDF-"}
DATA_URL = re.compile(r"data:(?P<type>[a-z]+/[a-z0-9.+-]+);base64,(?P<data>.*)", re.DOTALL)


def known_media() -> dict[str, str]:
    """sha256 of each committed media file -> what the fake model makes of it."""
    return {hashlib.sha256((MEDIA_DIR / name).read_bytes()).hexdigest(): what for name, what in MEDIA_CATALOG.items()
            if (MEDIA_DIR / name).exists()}


class PartError(ValueError):
    """A content part OpenRouter would refuse (or that is not the bytes WAHA served)."""


def _decode(data: Any, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise PartError(f"{where}: base64 data missing")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise PartError(f"{where}: not valid base64") from None


def _data_url(url: Any, where: str, allowed: set[str]) -> tuple[str, bytes]:
    match = DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise PartError(f"{where}: expected a data: URL with ;base64,")
    if match["type"] not in allowed:
        raise PartError(f"{where}: mimetype {match['type']} not one of {sorted(allowed)}")
    return match["type"], _decode(match["data"], where)


def check_part(part: Any, known: dict[str, str]) -> tuple[str, str | None, bytes | None]:
    """(kind, what the model makes of it, the decoded bytes) for one content part; PartError when refused."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise PartError("content part must be an object with a type")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise PartError("text part without text")
        return kind, part["text"], None
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        if audio.get("format") not in AUDIO_FORMATS:
            raise PartError(f"input_audio.format {audio.get('format')!r} not one of {sorted(AUDIO_FORMATS)}")
        if str(audio.get("data", "")).startswith("data:"):
            raise PartError("input_audio.data must be raw base64, not a data URL")
        declared, data = audio["format"], _decode(audio.get("data"), "input_audio.data")
    elif kind == "image_url":
        declared, data = _data_url((part.get("image_url") or {}).get("url"), "image_url.url", IMAGE_TYPES)
    elif kind == "file":
        document = part.get("file") or {}
        if not isinstance(document.get("filename"), str) or not document["filename"]:
            raise PartError("file.filename missing")
        declared, data = _data_url(document.get("file_data"), "file.file_data", {"application/pdf"})
    else:
        raise PartError(f"unknown content part type {kind!r}")
    if declared in MAGIC and not data.startswith(MAGIC[declared]) and not (
            declared == "application/pdf" and MAGIC[declared] in data[:1024]):
        raise PartError(f"{kind}: the bytes are not {declared}")
    what = known.get(hashlib.sha256(data).hexdigest())
    if what is None:
        raise PartError(f"{kind}: the bytes are none of the files WAHA served ({len(data)} bytes)")
    return kind, what, data


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def echo(text: str) -> str:
    """The default reply: "Echo: " + the last user message."""
    return "Echo: " + text


class FakeOpenRouter(FakeServer):
    """Fake OpenRouter: POST <prefix>/chat/completions (reply = "Echo: " + last user message), GET <prefix>/models.

    `reply` maps the last user message to the assistant's text (default: `echo`); the demo passes canned answers.
    Only `models` are served. Like OpenRouter, a request names its model in `model` and may list fallbacks in
    `models` (tried in order; the answer's `model` says which one served); an id in `retired` answers 404
    "No endpoints found", any other unknown id 400 "not a valid model ID". `usage.cost` is reported in USD.
    """

    fault_kinds = FakeServer.fault_kinds | {"error_200", "finish_error", "empty_content", "null_content", "malformed"}

    def __init__(self, *, api_key: str = "test-llm-key", host: str = "127.0.0.1", port: int = 0,
                 latency_s: float = 0.0, log_path: str | None = None,
                 models: tuple[str, ...] = tuple(CURRENT_MODELS), retired: tuple[str, ...] = RETIRED_MODELS,
                 reply: Callable[[str], str] = echo, cost_per_token_usd: float = 1e-6) -> None:
        super().__init__(host=host, port=port, latency_s=latency_s, log_path=log_path)
        self.api_key, self.models, self.reply = api_key, tuple(models), reply
        self.retired, self.cost_per_token_usd = tuple(retired), cost_per_token_usd
        self.known_media = known_media()
        self._media_seen: list[dict[str, Any]] = []  # every media part accepted: kind, sha256, size

    def media_seen(self) -> list[dict[str, Any]]:
        """Media parts of accepted requests, arrival order: {kind, sha256, size}."""
        with self._lock:
            return list(self._media_seen)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._media_seen.clear()

    def completions(self) -> list[Any]:
        """Bodies of all /chat/completions requests, arrival order."""
        return [r["body"] for r in self.requests("/chat/completions", "POST")]

    # -- HTTP --------------------------------------------------------------
    def error_body(self, status: int) -> Any:
        message, error_type = ERRORS.get(status, ("Provider returned error", "unmapped"))
        metadata: dict[str, Any] = {"error_type": error_type}
        if status in (502, 503):
            metadata |= PROVIDER_ERROR["metadata"]
        return {"error": {"code": status, "message": message, "metadata": metadata}}

    def fault_response(self, req: Request, rule: FaultRule) -> Response:
        if rule.kind is None or rule.body is not None or rule.raw_body is not None:
            return super().fault_response(req, rule)
        status, headers = rule.status or 200, dict(rule.headers or {})
        if rule.kind == "malformed":
            return Response(status, headers=headers, raw=b"<html><body>upstream hiccup</body></html>{not json")
        if rule.kind == "error_200":  # docs: errors after the 200 was committed arrive in the body
            return Response(status, {"error": PROVIDER_ERROR, "user_id": "user_fake"}, headers)
        reply = self._reply(req)
        if rule.kind == "finish_error":  # partial content on purpose: a client must check finish_reason too
            body = self._completion(req, reply[: len(reply) // 2], "error", "ERROR")
            body["choices"][0]["error"] = {"code": 502, "message": "Provider returned error",
                                           "metadata": {"error_type": "provider_unavailable"}}
        else:
            body = self._completion(req, "" if rule.kind == "empty_content" else None)
        return Response(status, body, headers)

    def route(self, req: Request) -> Response:
        if req.method == "GET" and req.path.endswith("/models"):  # public on OpenRouter: no key needed
            return Response(200, {"data": [self._model_entry(m) for m in self.models]})
        if not (req.method == "POST" and req.path.endswith("/chat/completions")):
            return Response(404, {"error": {"code": 404, "message": "Not Found"}})
        auth = req.headers.get("authorization")
        if auth != f"Bearer {self.api_key}":
            message = "No auth credentials found" if not auth else "User not found."
            return Response(401, {"error": {"code": 401, "message": message}})
        body = req.body if req.json_ok and isinstance(req.body, dict) else None
        if body is None or not isinstance(body.get("model"), str) or not body.get("messages") \
                or not isinstance(body["messages"], list):
            message = 'Input required: specify "model" and a non-empty "messages" array'
            return Response(400, {"error": {"code": 400, "message": message,
                                            "metadata": {"error_type": "invalid_request"}}})
        candidates = body.get("models") if isinstance(body.get("models"), list) else [body["model"]]
        served = next((m for m in candidates if m in self.models), None)
        if served is None:  # OpenRouter returns the last model's error when every fallback failed
            return self._unserved(str(candidates[-1]) if candidates else body["model"])
        try:
            reply = self._reply(req, record=True)
        except PartError as exc:
            return Response(400, {"error": {"code": 400, "message": f"Invalid content part: {exc}",
                                            "metadata": {"error_type": "invalid_request"}}})
        return Response(200, self._completion(req, reply, model=served))

    def _unserved(self, model: str) -> Response:
        if model in self.retired:
            return Response(404, {"error": {"code": 404, "message": f"No endpoints found for {model}."}})
        return Response(400, {"error": {"code": 400, "message": f"{model} is not a valid model ID"}})

    @staticmethod
    def _model_entry(model: str) -> dict[str, Any]:
        modalities = CURRENT_MODELS.get(model, ("text",))
        return {"id": model, "name": model, "context_length": 1048576,
                "architecture": {"input_modalities": list(modalities), "output_modalities": ["text"],
                                 "modality": "+".join(modalities) + "->text"}}

    def _reply(self, req: Request, *, record: bool = False) -> str:
        """The answer to the last user message. With media parts: each part is validated (PartError), the
        reply says what the model heard or saw ("<input_audio: ...>"), and when the system prompt asks
        for a [[nota]] the answer ends with one (the server must strip it)."""
        messages = req.body.get("messages") if isinstance(req.body, dict) else None
        users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1].get("content") if users else ""
        if not isinstance(content, list) or all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return self.reply(_text(content))
        said, notes, seen = [], [], []
        for part in content:
            kind, what, data = check_part(part, self.known_media)
            if data is None:
                said.append(what or "")
            else:
                said.append(f"<{kind}: {what}>")
                notes.append(what or "")
                seen.append({"kind": kind, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
        if record:
            with self._lock:
                self._media_seen.extend(seen)
        system = next((m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "system"),
                      "")
        note = f"\n[[nota]]{'; '.join(notes)}[[/nota]]" if "[[nota]]" in str(system) else ""
        return self.reply(" ".join(said)) + note

    def _completion(self, req: Request, content: str | None, finish: str = "stop",
                    native: str = "STOP", model: str | None = None) -> dict[str, Any]:
        body = req.body if isinstance(req.body, dict) else {}
        prompt = sum(len(_text(m.get("content")).split()) for m in body.get("messages") or [] if isinstance(m, dict))
        completion = len((content or "").split())
        return {
            "id": f"gen-{int(time.time())}-{secrets.token_urlsafe(15)}", "provider": "Google",
            "model": model or body.get("model") or (self.models[0] if self.models else "unknown"),
            "object": "chat.completion", "created": int(time.time()),
            "choices": [{"logprobs": None, "finish_reason": finish, "native_finish_reason": native, "index": 0,
                         "message": {"role": "assistant", "content": content, "refusal": None, "reasoning": None}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "cost": round((prompt + completion) * self.cost_per_token_usd, 9), "is_byok": False},
        }


if __name__ == "__main__":
    run_cli(FakeOpenRouter, "Fake OpenRouter server", lambda p: p.add_argument(
        "--models", type=lambda s: tuple(filter(None, s.split(","))), help="comma-separated model ids"))
