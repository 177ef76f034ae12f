"""The LLM client: OpenRouter or any OpenAI-compatible chat completions API, with retries, model fallbacks and cost."""

from __future__ import annotations

import asyncio
import copy
import random
import re
import time
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from typing import Any

import httpx

from whatsapp_webhook.logs import MessageLog
from whatsapp_webhook.metrics import (
    LLM_COST_USD,
    LLM_ERRORS,
    LLM_MODEL_UNAVAILABLE,
    LLM_SECONDS,
    LLM_TOKENS,
)
from whatsapp_webhook.policy import EveryMinute
from whatsapp_webhook.upstream import (
    TRANSIENT_STATUSES,
    EmptyReplyError,
    LLMError,
    backoff_seconds,
    error_message,
    metric_status,
    parse_retry_after,
    transport_error,
)


class ModelUnavailableError(LLMError):
    """The server does not serve this model id (retired, misspelt, not pulled): a configuration error.

    Trying again cannot help; trying the next configured model can.
    """

    def __init__(self, message: str, *, model: str, **details: Any) -> None:
        super().__init__(message, transient=False, **details)
        self.model = model


# How OpenRouter, OpenAI-style servers, Ollama, vLLM and llama.cpp say a model id is not served.
MODEL_UNAVAILABLE_PATTERN = re.compile(
    r"no endpoints found|not a valid model|model[^.]{0,80}(?:not found|does not exist|not exist)|unknown model"
    r"|model_not_found|invalid model (?:name|id)",
    re.IGNORECASE,
)

# OpenRouter's 404 for a served model that cannot take part of the request ("No endpoints found that support
# image input", "... input audio", "... tool use"): a media reply's failure, never a reason to stop using the model.
UNSUPPORTED_INPUT_PATTERN = re.compile(r"no endpoints found that support", re.IGNORECASE)


def model_unavailable_model(
    status: int | None, message: str, *, requested: str, candidates: Iterable[str] = ()
) -> str | None:
    """Which model an error says is not served, or None when the error is about something else.

    Only 400 and 404 answers (or an error inside a 200) whose text says so, or a 404 that names the
    model: a bare 404 is more often a base URL without its /v1. The model named in the text wins
    (OpenRouter names the last one of a `models` list it tried).
    """
    if UNSUPPORTED_INPUT_PATTERN.search(message):
        return None  # the model is served, just not with this request's input (an image, audio): not a retired id
    named = [m for m in (*candidates, requested) if m in message]
    if status not in (400, 404, 200, None) or not (
        MODEL_UNAVAILABLE_PATTERN.search(message) or (status == 404 and named)
    ):
        return None
    return max(named, key=len) if named else requested


@dataclass(frozen=True, kw_only=True)
class LLMReply:
    text: str
    model: str | None  # the model that answered, as the server reports it
    usage: Mapping[str, Any]
    attempts: int
    latency_seconds: float
    answered_by: str  # which of the configured ids wrote it
    configured_model: str
    unserved_models: tuple[str, ...] = ()  # configured models this worker currently knows are not served

    @property
    def cost_usd(self) -> float | None:
        """What the provider says this call cost (OpenRouter's usage.cost); None when it does not say."""
        cost = self.usage.get("cost")
        return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0 else None

    @property
    def from_fallback(self) -> bool:
        """True when a model other than the configured one wrote the reply."""
        return self.answered_by != self.configured_model


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the provider served from its prompt cache (usage.prompt_tokens_details.cached_tokens)."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 else 0


def served_model(answered: str | None, candidates: Iterable[str]) -> str | None:
    """Which requested id an answer's `model` is: equal, or a dated/variant form of it (longest match wins)."""
    if answered is None:
        return None
    matches = [m for m in candidates if answered == m or answered.startswith((m + "-", m + ":", m + "@"))]
    return max(matches, key=len) if matches else None


class UnservedModels:
    """The configured models this worker has been told are not served, each for RECHECK_SECONDS.

    While the configured model is known to be gone, requests start at the first fallback that may
    be served, so a retired id costs one failed request every few minutes, not one per message.
    """

    RECHECK_SECONDS = 600.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}

    def mark(self, model: str) -> None:
        self._until[model] = self.clock() + self.RECHECK_SECONDS

    def served(self, model: str) -> None:
        self._until.pop(model, None)

    def is_unserved(self, model: str) -> bool:
        until = self._until.get(model)
        if until is not None and until <= self.clock():
            del self._until[model]
            return False
        return until is not None

    def order(self, models: tuple[str, ...]) -> list[str]:
        """The models worth asking now, in configured order; all of them when every one is marked."""
        usable = [m for m in models if not self.is_unserved(m)]
        return usable or list(models)


class LLMClient:
    """Asks the chat completions endpoint for one reply, with bounded retries under one deadline."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        model: str,
        fallback_models: Iterable[str] = (),
        openrouter: bool = False,
        reasoning_effort: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.7,
        attempt_timeout: float = 30.0,
        deadline: float = 45.0,
        max_attempts: int = 3,
        retry_after_cap: float = 5.0,
        backoff_base: float = 0.5,
        app_title: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.url = httpx.URL(f"{self.base_url}/chat/completions")  # parsed once, not on every request
        self.model = model
        self.models = tuple(dict.fromkeys((model, *fallback_models)))
        # OpenRouter tries a `models` list itself; any other server gets one model per request.
        self.openrouter = openrouter
        self.reasoning_effort = reasoning_effort
        self.unserved = UnservedModels(clock=clock)
        self._config_errors = EveryMinute(clock=clock)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.retry_after_cap = retry_after_cap
        self.backoff_base = backoff_base
        self.sleep = sleep
        self.rng = rng
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if app_title:
            self.headers["X-Title"] = app_title

    def with_models(self, model: str, fallback_models: Iterable[str]) -> LLMClient:
        """The same client (connections, limits, key) asking other models: one WhatsApp number's own choice."""
        clone = copy.copy(self)
        clone.model = model
        clone.models = tuple(dict.fromkeys((model, *fallback_models)))
        clone.unserved = UnservedModels(clock=self.unserved.clock)
        clone._config_errors = EveryMinute(clock=self.unserved.clock)
        return clone

    def _body(self, messages: list[dict[str, Any]], models: list[str], user: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": models[0],
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.openrouter:
            if len(models) > 1:
                body["models"] = models
            if self.reasoning_effort:
                # The fallback is a thinking model: unbounded thinking can spend all of max_tokens and
                # come back empty (openrouter.md §6.7). The reply never shows the reasoning anyway.
                body["reasoning"] = {"effort": self.reasoning_effort, "exclude": True}
        if user:
            body["user"] = user
        return body

    async def complete(
        self, messages: list[dict[str, Any]], *, user: str | None = None, log: MessageLog | None = None
    ) -> LLMReply:
        """Return the reply text, or raise LLMError once retries, models or the deadline are used up.

        `log` is the message's bound log, so retries and configuration errors name its event and chat.
        """
        message_log = log or MessageLog()
        models = self.unserved.order(self.models)
        body = self._body(messages, models, user)
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_at = started + self.deadline
        empty_retried = False
        attempt = 0
        while True:
            attempt += 1
            remaining = give_up_at - loop.time()
            try:
                async with asyncio.timeout(min(self.attempt_timeout, remaining)):
                    text, model, usage = await self._attempt(body)
                LLM_SECONDS.observe(loop.time() - started)
                for kind in ("prompt_tokens", "completion_tokens"):
                    if isinstance(usage.get(kind), int):
                        LLM_TOKENS.labels(kind.removesuffix("_tokens")).inc(usage[kind])
                if cached := cached_prompt_tokens(usage):
                    LLM_TOKENS.labels("cached").inc(cached)
                # Only OpenRouter picks among `models` itself; elsewhere the answer is from what we asked for
                # (llama.cpp, for one, reports whatever name it likes).
                answered_by = (served_model(model, models) if self.openrouter else None) or models[0]
                self.unserved.served(answered_by)
                reply = LLMReply(
                    text=text,
                    model=model,
                    usage=usage,
                    attempts=attempt,
                    latency_seconds=loop.time() - started,
                    answered_by=answered_by,
                    configured_model=self.model,
                    unserved_models=tuple(m for m in self.models if self.unserved.is_unserved(m)),
                )
                if reply.cost_usd:
                    LLM_COST_USD.inc(reply.cost_usd)
                return reply
            except TimeoutError:
                error: LLMError = LLMError(
                    f"timed out: no answer within {min(self.attempt_timeout, remaining):.1f}s", transient=True
                )
            except LLMError as exc:
                error = exc
            LLM_ERRORS.labels(metric_status(error)).inc()
            if isinstance(error, ModelUnavailableError):
                self._report_unserved(error, message_log)
                models = [m for m in models if m != error.model]
                if not models:
                    raise error
                body = self._body(messages, models, user)
                attempt -= 1  # another model is a new request, not a retry of a transient failure
                continue
            if isinstance(error, EmptyReplyError):
                if empty_retried:
                    raise error
                empty_retried = True
            if not error.transient or attempt >= self.max_attempts:
                raise error
            if error.retry_after is not None and error.retry_after > self.retry_after_cap:
                raise LLMError(
                    f"asked to retry after {error.retry_after:.0f}s, more than we wait: {error.args[0]}",
                    status=error.status,
                    transient=False,
                )
            delay = (
                error.retry_after
                if error.retry_after is not None
                else backoff_seconds(attempt, base=self.backoff_base, rng=self.rng)
            )
            if loop.time() + delay >= give_up_at:
                raise error
            message_log.warning(
                "llm attempt %(attempt)d failed, retrying in %(delay).2fs: %(error)s",
                {"attempt": attempt, "delay": delay, "error": str(error)},
            )
            await self.sleep(delay)

    def _report_unserved(self, error: ModelUnavailableError, message_log: MessageLog) -> None:
        self.unserved.mark(error.model)
        LLM_MODEL_UNAVAILABLE.labels(error.model).inc()
        quiet = self._config_errors.due(error.model)
        if quiet is None:
            return
        setting = "OPENROUTER_MODEL" if error.model == self.model else "OPENROUTER_FALLBACK_MODELS"
        message_log.error(
            "llm model_unavailable model=%(model)s setting=%(setting)s: %(base_url)s answered that it does not serve"
            " this model (%(answer)s). Set %(setting)s to a served id; `python whatsapp_webhook_server.py --check`"
            " lists them." + (f" ({quiet} more such answers in the last minute)" if quiet else ""),
            {"model": error.model, "setting": setting, "base_url": self.base_url, "answer": str(error.args[0])},
        )

    async def _attempt(self, body: dict[str, Any]) -> tuple[str, str | None, Mapping[str, Any]]:
        try:
            response = await self.http.post(self.url, json=body, headers=self.headers)
        except httpx.TransportError as exc:
            raise transport_error(exc, LLMError) from None
        if response.status_code != 200:
            message = error_message(response)
            unserved = model_unavailable_model(
                response.status_code, message, requested=body["model"], candidates=body.get("models") or [body["model"]]
            )
            if unserved is not None:
                raise ModelUnavailableError(message, model=unserved, status=response.status_code)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            # A 402 is final unless OpenRouter says when to come back (its in-flight budget limit).
            transient = response.status_code in TRANSIENT_STATUSES or (
                response.status_code == 402 and retry_after is not None
            )
            raise LLMError(message, status=response.status_code, transient=transient, retry_after=retry_after)
        return self._reply_from(response, body)

    @staticmethod
    def _reply_from(response: httpx.Response, body: Mapping[str, Any]) -> tuple[str, str | None, Mapping[str, Any]]:
        """Apply OpenRouter's rule: a 200 is a reply only with choices, no error and non-empty content."""
        try:
            data = response.json()
        except ValueError:
            raise LLMError("200 response is not JSON", status=200, transient=True) from None
        if not isinstance(data, dict):
            raise LLMError("200 response is not a JSON object", status=200, transient=True)
        if isinstance(data.get("error"), dict):
            code = data["error"].get("code")
            message = error_message(response)
            unserved = model_unavailable_model(
                code if isinstance(code, int) else 200,
                message,
                requested=body["model"],
                candidates=body.get("models") or (),
            )
            if unserved is not None:
                raise ModelUnavailableError(f"error in 200 body: {message}", model=unserved, status=200)
            raise LLMError(
                f"error in 200 body: {message}",
                status=200,
                transient=not isinstance(code, int) or code in TRANSIENT_STATUSES,
            )
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError("200 response has no choices", status=200, transient=True)
        choice = choices[0]
        if choice.get("finish_reason") == "error" or isinstance(choice.get("error"), dict):
            code = choice["error"].get("code") if isinstance(choice.get("error"), dict) else None
            raise LLMError(
                f"provider failed while generating (finish_reason=error, code={code})",
                status=200,
                transient=not isinstance(code, int) or code in TRANSIENT_STATUSES,
            )
        if choice.get("finish_reason") == "content_filter":
            # What is left after filtering is not an answer we can stand behind.
            raise LLMError("reply withheld by the provider's content filter", status=200, transient=False)
        raw_reply_message = choice.get("message")
        reply_message: Mapping[str, Any] = raw_reply_message if isinstance(raw_reply_message, dict) else {}
        content = reply_message.get("content")
        if not isinstance(content, str) or not content.strip():
            reason = choice.get("finish_reason")
            raise EmptyReplyError(f"empty content (finish_reason={reason})", status=200, transient=True)
        raw_usage = data.get("usage")
        usage: Mapping[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        raw_model = data.get("model")
        model = raw_model if isinstance(raw_model, str) else None
        return content.strip(), model, usage
