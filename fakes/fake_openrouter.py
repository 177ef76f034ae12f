"""FakeOpenRouter: OpenAI-compatible /chat/completions that echoes the last user message, plus scripted failures."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
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
        return Response(200, self._completion(req, self._reply(req), model=served))

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

    def _reply(self, req: Request) -> str:
        messages = req.body.get("messages") if isinstance(req.body, dict) else None
        users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
        return self.reply(_text(users[-1].get("content")) if users else "")

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
