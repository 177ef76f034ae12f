"""Prometheus metrics. Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before this module is
imported, so every worker writes its own files and /metrics adds them up. The gauges that describe the shared
store (inbox backlog, /health checks) are read once per scrape instead: see ScrapeTimeCollector."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import GaugeMetricFamily

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


SLOW_REQUESTS_CLOSED = Counter(
    "webhook_slow_requests_closed",
    "Connections closed because their request did not arrive within REQUEST_READ_TIMEOUT_SECONDS",
)


LLM_SECONDS = Histogram(
    "webhook_llm_duration_seconds",
    "LLM call time, retries included",
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60),
)


LLM_ERRORS = Counter("webhook_llm_errors", "Failed LLM attempts", ["status"])


# One series per configured WhatsApp number (SESSIONS_FILE's tables and "default"; others count as "_other").
SESSION_MESSAGES = Counter(
    "webhook_session_messages",
    "Finished messages by WAHA session and outcome (success, fallback, notice...)",
    ["session", "outcome"],
)


SESSION_LLM_COST_USD = Counter(
    "webhook_session_llm_cost_usd", "What the LLM provider reported the replies cost, by WAHA session, USD", ["session"]
)


LLM_TOKENS = Counter("webhook_llm_tokens", "Tokens used by successful LLM calls", ["kind"])


LLM_COST_USD = Counter("webhook_llm_cost_usd", "What the LLM provider reported the replies cost (usage.cost), USD")


LLM_MODEL_UNAVAILABLE = Counter(
    "webhook_llm_model_unavailable",
    "LLM answers saying a configured model is not served (a configuration error)",
    ["model"],
)


WAHA_ERRORS = Counter("webhook_waha_errors", "Failed WAHA calls", ["endpoint", "status"])


MEDIA_RECEIVED = Counter("webhook_media_received", "Customer media recorded for a reply, by kind", ["kind"])


MEDIA_BYTES_DOWNLOADED = Counter("webhook_media_bytes_downloaded", "Media bytes downloaded from WAHA and kept")


MEDIA_FAILURES = Counter("webhook_media_failures", "Media that could not be had or understood, by reason", ["reason"])


REPLIES_IN_FLIGHT = Gauge(
    "webhook_replies_in_flight", "Replies being prepared or sent right now", multiprocess_mode="livesum"
)


@dataclass(frozen=True, kw_only=True)
class ScrapeReading:
    """What one scrape read from the store every worker shares. `inbox` is None when the store could not be read."""

    inbox: Mapping[str, int] | None = None  # unfinished messages by inbox status
    retrying: int | None = None  # queued messages waiting for another attempt after a failed one
    health_checks: Mapping[str, int] = field(default_factory=dict)  # check name -> 0 ok, 1 degraded, 2 failing


class ScrapeTimeCollector:
    """The gauges read from the shared store at scrape time, in a registry of their own made for that scrape.

    Not prometheus_client Gauges: under gunicorn those write one file per worker, which /metrics would add up
    (two workers reporting one backlog would show it twice) and which keep a dead worker's last value. These
    are the same whichever worker answers, because they come from the shared store. With no reading, the
    families are declared without samples (what the tests check the dashboard and alert rules against).
    """

    def __init__(self, reading: ScrapeReading | None = None) -> None:
        self.reading = reading or ScrapeReading()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self.reading
        inbox = GaugeMetricFamily(
            "webhook_inbox_messages",
            "Unfinished messages in the inbox by status (queued, processing, sending, merged), read at scrape time",
            labels=["status"],
        )
        for status, count in (reading.inbox or {}).items():
            inbox.add_metric([status], count)
        yield inbox
        retrying = GaugeMetricFamily(
            "webhook_inbox_retrying_messages",
            "Queued messages waiting for another attempt after a failed one, read at scrape time",
        )
        if reading.retrying is not None:
            retrying.add_metric([], reading.retrying)
        yield retrying
        checks = GaugeMetricFamily(
            "webhook_health_check_status",
            "The /health checks (store, llm, waha): 0 ok, 1 degraded, 2 failing",
            labels=["check"],
        )
        for name, severity in reading.health_checks.items():
            checks.add_metric([name], severity)
        yield checks


def metrics_document(reading: ScrapeReading | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition, summed over all gunicorn workers when running under gunicorn,
    followed by the gauges this scrape read from the shared store."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry(support_collectors_without_names=True)
        # prometheus_client ships MultiProcessCollector.__init__ without annotations.
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    scrape_time = prometheus_client.CollectorRegistry(auto_describe=False)
    scrape_time.register(ScrapeTimeCollector(reading))
    body = prometheus_client.generate_latest(registry) + prometheus_client.generate_latest(scrape_time)
    return body, prometheus_client.CONTENT_TYPE_LATEST
