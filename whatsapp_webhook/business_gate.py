"""The business's decisions on the reply path, with their store calls: the out-of-hours notice or silence, the
daily LLM budget, and the per-session counters. ReplyPipeline asks BusinessGate; the decisions themselves are
business's pure functions (out_of_hours_action, budget_verdict, finished_counts)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from whatsapp_webhook.business import (
    BUDGET_MARK_CHAT,
    OUT_OF_HOURS_MARK,
    BusinessProfiles,
    OutOfHoursAction,
    SessionProfile,
    finished_counts,
    out_of_hours_action,
)
from whatsapp_webhook.health import CheckStatus, HealthReporter
from whatsapp_webhook.logs import log
from whatsapp_webhook.metrics import SESSION_LLM_COST_USD, SESSION_MESSAGES
from whatsapp_webhook.store_api import StoreUnavailable

if TYPE_CHECKING:
    from whatsapp_webhook.hours import HoursStatus
    from whatsapp_webhook.logs import MessageLog
    from whatsapp_webhook.store_api import Store


class BusinessGate:
    """One worker's view of the business rules that need the shared store (called from the event loop)."""

    def __init__(
        self, *, profiles: BusinessProfiles, store: Store, health: HealthReporter, clock: Callable[[], float]
    ) -> None:
        self.profiles, self.store, self.health, self.clock = profiles, store, health, clock
        self._budget_logged: set[tuple[str, str]] = set()  # (scope, day) this worker already asked the store about

    async def _report(self, name: str, status: CheckStatus, reason: str) -> None:
        if self.health.needs_write(name, status, reason):
            await asyncio.to_thread(self.health.report, name, status, reason)

    async def out_of_hours(
        self, chat_key: str, profile: SessionProfile, hours: HoursStatus, context: MessageLog
    ) -> OutOfHoursAction:
        """Closed and not in answer mode: the period's one notice (a store mark, shared by every worker) or silence."""
        mode = profile.settings.out_of_hours_mode
        if hours.is_open or mode == "answer":
            return OutOfHoursAction.ANSWER
        first = mode == "notice" and await asyncio.to_thread(
            self.store.mark_once, chat_key, OUT_OF_HOURS_MARK, hours.closed_period
        )
        action = out_of_hours_action(mode, hours, first_in_period=first)
        context.info(
            "decision=%(decision)s reason=%(reason)s next_open=%(next_open)s",
            {
                "decision": "skipped" if action is OutOfHoursAction.SILENT else "notice",
                "reason": "out_of_hours",
                "next_open": hours.closed_period,
            },
        )
        return action

    async def within_budget(self, profile: SessionProfile, context: MessageLog) -> bool:
        """False once today's LLM spend reached a daily cap: the reply is FALLBACK_MESSAGE, without an LLM call."""
        if not profile.has_budget:
            return True
        verdict = await asyncio.to_thread(self.profiles.budget, self.store, profile, self.clock())
        check = f"llm:budget:{profile.counted_as}"
        if verdict.allowed:
            await self._report(check, CheckStatus.OK, "the daily LLM budget is not reached")
            return True
        zone = profile.schedule.timezone.key
        reason = (
            f"{verdict.scope}={verdict.cap_usd:g} USD reached today ({verdict.spent_usd:.4f} USD spent): customers"
            f" get FALLBACK_MESSAGE without an LLM call until midnight ({zone})"
        )
        await self._report(check, CheckStatus.DEGRADED, reason)
        logged = (verdict.scope, profile.day(self.clock()))
        first = False
        if logged not in self._budget_logged:
            self._budget_logged.add(logged)
            # Once for the whole server, whichever worker or host sees it first (a mark in the shared store).
            first = await asyncio.to_thread(self.store.mark_once, BUDGET_MARK_CHAT, verdict.scope, logged[1])
        if first:
            context.warning("llm decision=%(decision)s: %(reason)s", {"decision": "budget_reached", "reason": reason})
        context.info("decision=%(decision)s reason=%(reason)s", {"decision": "fallback", "reason": "budget"})
        return False

    async def record_spend(self, profile: SessionProfile, cost_usd: float) -> None:
        """Today's spend, at once (the next message's budget check must see it); only when a budget applies."""
        if cost_usd and profile.has_budget:
            try:
                await asyncio.to_thread(self.profiles.record_spend, self.store, profile, self.clock(), cost_usd)
            except StoreUnavailable as exc:  # the reply is paid for: write it, not ask the LLM again on a retry
                log.warning("LLM spend of a reply not recorded (the daily budget counts less): %s", exc)

    def finished_counts(self, session: str, outcome: str, count: int, cost_usd: float) -> dict[str, int]:
        """/stats' per-session counts of a finished message, for the store to add in the finish's own commit
        (a second write per message cost a thread hop and a transaction)."""
        return finished_counts(self.profiles.profile(session).counted_as, outcome, count, cost_usd)

    def count_finished(self, session: str, outcome: str, count: int, cost_usd: float) -> None:
        """/metrics' per-session counts: only once the store says this finish took effect."""
        counted_as = self.profiles.profile(session).counted_as
        SESSION_MESSAGES.labels(counted_as, outcome).inc(count)
        if cost_usd:
            SESSION_LLM_COST_USD.labels(counted_as).inc(cost_usd)
