"""Prometheus metrics. Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before this module is
imported, so every worker writes its own files and /metrics adds them up."""

from __future__ import annotations

import os

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess

MESSAGES_RECEIVED = Counter("webhook_messages_received", "Customer messages recorded for a reply")


MESSAGES_PROCESSED = Counter("webhook_messages_processed", "Messages answered (LLM reply or text-only note)")


MESSAGES_FAILED = Counter(
    "webhook_messages_failed", "Messages answered with the fallback, or given up after every attempt", ["reason"]
)


PROCESSING_SECONDS = Histogram(
    "webhook_processing_duration_seconds",
    "From the message being recorded to its reply reaching WAHA",
    buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300, 900),
)


MESSAGES_SKIPPED = Counter(
    "webhook_messages_skipped", "Messages deliberately left unanswered: chat paused, opted out, loop or over a limit"
)


MESSAGES_IGNORED = Counter("webhook_messages_ignored", "Events deliberately not answered", ["reason"])


REQUESTS_REJECTED = Counter("webhook_requests_rejected", "Webhook requests refused", ["status"])


LLM_SECONDS = Histogram(
    "webhook_llm_duration_seconds",
    "LLM call time, retries included",
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60),
)


LLM_ERRORS = Counter("webhook_llm_errors", "Failed LLM attempts", ["status"])


LLM_TOKENS = Counter("webhook_llm_tokens", "Tokens used by successful LLM calls", ["kind"])


LLM_COST_USD = Counter("webhook_llm_cost_usd", "What the LLM provider reported the replies cost (usage.cost), USD")


LLM_MODEL_UNAVAILABLE = Counter(
    "webhook_llm_model_unavailable",
    "LLM answers saying a configured model is not served (a configuration error)",
    ["model"],
)


WAHA_ERRORS = Counter("webhook_waha_errors", "Failed WAHA calls", ["endpoint", "status"])


REPLIES_IN_FLIGHT = Gauge(
    "webhook_replies_in_flight", "Replies being prepared or sent right now", multiprocess_mode="livesum"
)


def metrics_document() -> tuple[bytes, str]:
    """The Prometheus text exposition, summed over all gunicorn workers when running under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry(support_collectors_without_names=True)
        # prometheus_client ships MultiProcessCollector.__init__ without annotations.
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
