"""Health: what /health reports, one document shared by every worker through the store."""

from __future__ import annotations

import threading
import time
from collections.abc import (
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.logs import log
from whatsapp_webhook.store_api import StoreUnavailable

if TYPE_CHECKING:
    from whatsapp_webhook.store_api import Store


class CheckStatus(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # replies still go out, but not as configured (a fallback model, a session not WORKING)
    FAILING = "failing"  # this part does not work at all


class ServerHealth(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # HTTP 200: messages are recorded and answered, something needs a look
    UNHEALTHY = "unhealthy"  # HTTP 503: a new message cannot be recorded


CHECK_SEVERITY = {CheckStatus.OK: 0, CheckStatus.DEGRADED: 1, CheckStatus.FAILING: 2}


# The parts /health always reports. Reports are stored under a part's name, or "part:detail"
# ("waha:default", one per WAHA session); the part shows the worst of them.
HEALTH_CHECKS = ("store", "llm", "waha")


@dataclass(frozen=True, kw_only=True)
class HealthCheck:
    status: CheckStatus
    reason: str
    since: float  # when this status began (unix seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "reason": self.reason,
            "since": datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds"),
        }


def combine_checks(reports: Iterable[HealthCheck]) -> HealthCheck | None:
    """One part's status from its reports (several WAHA sessions): the worst, with the reasons for it."""
    reports = list(reports)
    if not reports:
        return None
    worst = max(CHECK_SEVERITY[r.status] for r in reports)
    chosen = [r for r in reports if CHECK_SEVERITY[r.status] == worst]
    return HealthCheck(
        status=chosen[0].status,
        reason="; ".join(dict.fromkeys(r.reason for r in chosen)),
        since=min(r.since for r in chosen),
    )


def overall_health(checks: Mapping[str, HealthCheck]) -> ServerHealth:
    """Unhealthy only when a message cannot be recorded; degraded when anything else is not ok."""
    store = checks.get("store")
    if store is not None and store.status is CheckStatus.FAILING:
        return ServerHealth.UNHEALTHY
    if any(check.status is not CheckStatus.OK for check in checks.values()):
        return ServerHealth.DEGRADED
    return ServerHealth.HEALTHY


class HealthReporter:
    """Writes what a worker learns (a fallback model answered, WAHA said 422) into the shared store.

    Only changes are written, and an unchanged report again after REFRESH_SECONDS (another worker
    may have written something else meanwhile), so steady traffic costs no writes.
    """

    REFRESH_SECONDS = 10.0
    MAX_PARTS = 200  # bounds the rows one part ("waha:<session>") can create

    def __init__(self, *, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._written: dict[str, tuple[CheckStatus, str, float]] = {}

    def needs_write(self, name: str, status: CheckStatus, reason: str) -> bool:
        with self._lock:
            written = self._written.get(name)
        return written is None or written[:2] != (status, reason) or self.clock() - written[2] >= self.REFRESH_SECONDS

    def report(self, name: str, status: CheckStatus, reason: str) -> None:
        """Record a part's state (blocking: call from a thread). A store failure only costs the report."""
        if not self.needs_write(name, status, reason):
            return
        try:
            self.store.set_health(name, status, reason, max_parts=self.MAX_PARTS)
        except StoreUnavailable as exc:
            log.warning("could not record health %s=%s: %s", name, status, exc)
            return
        with self._lock:
            self._written[name] = (status, reason, self.clock())

    def last_known(self) -> dict[str, HealthCheck]:
        """What this worker last wrote, for when the shared store cannot be read."""
        with self._lock:
            written = dict(self._written)
        now = time.time()
        return {
            name: HealthCheck(status=status, reason=reason, since=now) for name, (status, reason, _) in written.items()
        }
