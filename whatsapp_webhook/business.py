"""What the bot knows about the business it answers for: its prompt, its knowledge, its opening hours.

A SessionProfile is one WAHA session's (one WhatsApp number's) effective configuration; BusinessProfiles
gives the pipeline the profile of a message's session. The prompt is laid out for providers' prompt caching:
the stable part (system prompt and knowledge) first, the turns next, and what changes every minute (the date
and whether the business is open) last, just before the customer's message."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.hours import HoursStatus, Schedule, build_schedule, hours_status, notice_text, prompt_note
from whatsapp_webhook.knowledge import KnowledgeBase
from whatsapp_webhook.logs import log
from whatsapp_webhook.sessions_config import (
    SessionsConfig,
    SessionsFile,
    effective_settings,
    session_value_problems,
)

if TYPE_CHECKING:
    from whatsapp_webhook.llm import LLMClient
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import Store, Turn

OUT_OF_HOURS_MARK = "out_of_hours_notice"  # Store.mark_once's name for "this closed period's notice went out"
BUDGET_MARK_CHAT = "*llm_budget*"  # Store.mark_once's chat for "this cap's day was logged" (no real chat id)
GLOBAL = "*"  # the profile of every session SESSIONS_FILE does not name
OTHER_SESSIONS = "_other"  # counters of sessions nobody configured, so a stray name cannot add rows forever
NANO = 1_000_000_000  # counters are integers: dollars are counted in billionths


def spend_counter(day: str, session: str | None = None) -> str:
    """The store counter of one day's LLM cost (a calendar day in BUSINESS_TIMEZONE), all or one session's."""
    return f"llm_spend.{day}" + (f".{session}" if session else "")


def session_counter(session: str, name: str) -> str:
    """A per-session counter: session.<name>.<what> (an outcome, or llm_cost_nanousd)."""
    return f"session.{session}.{name}"


class OutOfHoursAction(StrEnum):
    """What a message gets with respect to the opening hours."""

    ANSWER = "answer"  # open, or OUT_OF_HOURS_MODE=answer: the usual reply
    NOTICE = "notice"  # the closed period's one OUT_OF_HOURS_NOTICE, no LLM call
    SILENT = "silent"  # closed: no reply (silent mode, or the notice already went out)


def out_of_hours_action(mode: str, status: HoursStatus, *, first_in_period: bool) -> OutOfHoursAction:
    """Pure decision: open, or answer mode -> ANSWER; notice mode -> NOTICE once per closed period; else SILENT."""
    if status.is_open or mode == "answer":
        return OutOfHoursAction.ANSWER
    if mode == "notice" and first_in_period:
        return OutOfHoursAction.NOTICE
    return OutOfHoursAction.SILENT


@dataclass(frozen=True, kw_only=True)
class BudgetVerdict:
    """Whether the day's LLM spend leaves room for another call, and which cap says no."""

    allowed: bool
    cap_usd: float = 0.0
    spent_usd: float = 0.0
    scope: str = ""  # "LLM_DAILY_BUDGET_USD" or "[session] llm_daily_budget_usd"


def budget_verdict(
    *, global_cap: float, global_spent: float, session_cap: float | None, session_spent: float, session: str
) -> BudgetVerdict:
    """Pure decision: a cap of 0 (or none) means no cap; spend at or over a cap stops LLM calls."""
    if global_cap > 0 and global_spent >= global_cap:
        return BudgetVerdict(allowed=False, cap_usd=global_cap, spent_usd=global_spent, scope="LLM_DAILY_BUDGET_USD")
    if session_cap is not None and session_cap > 0 and session_spent >= session_cap:
        return BudgetVerdict(
            allowed=False, cap_usd=session_cap, spent_usd=session_spent, scope=f"[{session}] llm_daily_budget_usd"
        )
    return BudgetVerdict(allowed=True)


@dataclass(kw_only=True)
class SessionProfile:
    """One WhatsApp number's effective configuration, with its parsed hours and its knowledge files."""

    name: str  # the WAHA session, or GLOBAL
    settings: Settings
    schedule: Schedule
    knowledge: KnowledgeBase
    enabled: bool = True
    session_budget_usd: float | None = None  # set in SESSIONS_FILE: this number's own daily cap
    counted_as: str = OTHER_SESSIONS  # the session name its counters carry
    llm: LLMClient | None = None  # None: the pipeline's own (the global models)
    _system: tuple[int, str] = field(default=(-1, ""), repr=False)

    def hours(self, now: float) -> HoursStatus:
        return hours_status(self.schedule, now)

    def day(self, now: float) -> str:
        """Today in the business's zone: the daily budget starts again at its midnight."""
        return datetime.fromtimestamp(now, self.schedule.timezone).date().isoformat()

    @property
    def has_budget(self) -> bool:
        return self.settings.llm_daily_budget_usd > 0 or bool(self.session_budget_usd)

    def system_prompt(self) -> str:
        """The stable part: AI_SYSTEM_PROMPT, then the knowledge (rebuilt only when the knowledge changed)."""
        section = self.knowledge.section()
        version, text = self._system
        if version != self.knowledge.version or not text:
            text = self.settings.ai_system_prompt + (f"\n\n{section}" if section else "")
            self._system = (self.knowledge.version, text)
        return text

    def prompt(
        self,
        status: HoursStatus,
        history: list[Turn],
        user_turn: str | list[dict[str, Any]],
        instructions: str | None = None,
    ) -> list[dict[str, Any]]:
        """The chat completion's messages: stable system part, turns, this minute's hours note, the customer.
        `instructions` (what a media reply must add) follow the stable part, so only such replies change it."""
        system = self.system_prompt() + (f"\n\n{instructions}" if instructions else "")
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        messages.extend({"role": turn.role, "content": turn.content} for turn in history)
        if not self.schedule.always_open:
            messages.append({"role": "system", "content": prompt_note(self.schedule, status)})
        messages.append({"role": "user", "content": user_turn})
        return messages

    def notice(self, status: HoursStatus) -> str:
        return notice_text(self.settings.out_of_hours_notice, self.schedule, status)


class BusinessProfiles:
    """The profile of each WAHA session: SESSIONS_FILE's tables over the global settings, rebuilt when the file
    changes. Knowledge files are shared between profiles that name the same ones, and survive a rebuild."""

    def __init__(self, settings: Settings, *, llm: LLMClient | None = None) -> None:
        self.settings = settings
        self.base_llm = llm
        self.sessions = SessionsFile(settings.sessions_file)
        self._lock = threading.Lock()
        self._knowledge: dict[tuple[str, int], KnowledgeBase] = {}
        self._llms: dict[tuple[str, ...], LLMClient] = {}
        self._built_from = -1
        self._profiles: dict[str, SessionProfile] = {}
        self._default = self._build("default", settings, None)  # WAHA's one session in WAHA Core
        self._other = self._build(GLOBAL, settings, None)  # any other session the file does not name

    def _knowledge_for(self, settings: Settings) -> KnowledgeBase:
        key = (settings.ai_knowledge_file, settings.ai_knowledge_max_chars)
        if key not in self._knowledge:
            self._knowledge[key] = KnowledgeBase(*key)
        return self._knowledge[key]

    def _llm_for(self, settings: Settings) -> LLMClient | None:
        if self.base_llm is None:
            return None
        models = settings.llm_models
        if models == self.base_llm.models:
            return self.base_llm
        if models not in self._llms:
            self._llms[models] = self.base_llm.with_models(
                settings.openrouter_model, settings.openrouter_fallback_models
            )
        return self._llms[models]

    def _build(self, name: str, settings: Settings, config: SessionsConfig | None) -> SessionProfile:
        overrides = config.overrides(name) if config else None
        # A session's llm_daily_budget_usd is its own cap; LLM_DAILY_BUDGET_USD stays the cap of all together.
        effective = replace(effective_settings(settings, overrides), llm_daily_budget_usd=settings.llm_daily_budget_usd)
        return SessionProfile(
            name=name,
            settings=effective,
            schedule=build_schedule(
                effective.business_hours, timezone=effective.business_timezone, holidays=effective.business_holidays
            ),
            knowledge=self._knowledge_for(effective),
            enabled=overrides.enabled if overrides else True,
            session_budget_usd=overrides.values.get("llm_daily_budget_usd") if overrides else None,
            counted_as=name if overrides or name == "default" else OTHER_SESSIONS,
            llm=self._llm_for(effective),
        )

    def _rebuild(self, config: SessionsConfig) -> None:
        """New profiles from a changed SESSIONS_FILE; one whose values are wrong keeps the profiles it had."""
        problems = [
            problem
            for name, overrides in config.sessions.items()
            for problem in session_value_problems(name, effective_settings(self.settings, overrides))
        ]
        if problems:
            log.error("SESSIONS_FILE not applied: %s", "; ".join(problems))
            return
        self._profiles = {name: self._build(name, self.settings, config) for name in config.sessions}

    def profile(self, session: str) -> SessionProfile:
        if self.settings.sessions_file:
            config = self.sessions.current()
            with self._lock:
                if self.sessions.version != self._built_from:
                    self._built_from = self.sessions.version
                    self._rebuild(config)
                found = self._profiles.get(session)
            if found is not None:
                return found
        return self._default if session == "default" else self._other

    def all_profiles(self) -> dict[str, SessionProfile]:
        """Every configured session's profile, the global one as GLOBAL (for --check)."""
        self.profile("default")
        with self._lock:
            return {GLOBAL: self._other, **self._profiles}

    # --- the daily budget and the per-session counters (blocking store calls: run them in a thread) -------

    def budget(self, store: Store, profile: SessionProfile, now: float) -> BudgetVerdict:
        """Today's spend against LLM_DAILY_BUDGET_USD (all sessions, the global zone's day) and the session's cap."""
        if not profile.has_budget:
            return BudgetVerdict(allowed=True)
        everyone = spend_counter(self._other.day(now))
        own = spend_counter(profile.day(now), profile.counted_as)
        spent = store.read_counters([everyone, own])
        return budget_verdict(
            global_cap=self.settings.llm_daily_budget_usd,
            global_spent=spent[everyone] / NANO,
            session_cap=profile.session_budget_usd,
            session_spent=spent[own] / NANO,
            session=profile.counted_as,
        )

    def record_spend(self, store: Store, profile: SessionProfile, now: float, cost_usd: float) -> None:
        """Add what the provider said a reply cost to today's totals (all sessions and this one's), at once:
        the next message's budget check must see it. Only written when a budget applies."""
        nanos = round(cost_usd * NANO)
        if nanos > 0 and profile.has_budget:
            store.count_many(
                {
                    spend_counter(self._other.day(now)): nanos,
                    spend_counter(profile.day(now), profile.counted_as): nanos,
                }
            )


def finished_counts(session: str, outcome: str, count: int, cost_usd: float) -> dict[str, int]:
    """The per-session counters one finished message adds (written in one store call)."""
    counts = {session_counter(session, outcome): count}
    if (nanos := round(cost_usd * NANO)) > 0:
        counts[session_counter(session, "llm_cost_nanousd")] = nanos
    return counts


def session_breakdown(counters: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """/stats' by_session: each session's messages by outcome and its LLM cost, from the store's counters."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in sorted(counters.items()):
        if not name.startswith("session."):
            continue
        session, _, what = name[len("session.") :].rpartition(".")
        if not session:
            continue
        entry = found.setdefault(session, {"messages": {}, "llm_cost_usd": 0.0})
        if what == "llm_cost_nanousd":
            entry["llm_cost_usd"] = round(value / NANO, 6)
        else:
            entry["messages"][what] = value
    return found


def describe_profile(profile: SessionProfile) -> str:
    """One --check line: a session's effective configuration, without secrets (no key is a session setting)."""
    settings = profile.settings
    who = "sessions not in SESSIONS_FILE" if profile.name == GLOBAL else f"session {profile.name}"
    if not profile.enabled:
        return f"{who}: disabled (enabled = false: never answered)"
    fallbacks = ", ".join(settings.openrouter_fallback_models) or "none"
    hours = (
        f"hours {profile.schedule.spec!r} ({profile.schedule.timezone.key}"
        + (f", holidays: {len(profile.schedule.holidays)}" if profile.schedule.holidays else "")
        + f"), out of hours: {settings.out_of_hours_mode}"
        if not profile.schedule.always_open
        else "hours: always open"
    )
    section = profile.knowledge.section()
    knowledge = f"knowledge {settings.ai_knowledge_file} ({len(section):,} chars)" if section else "no knowledge file"
    prompt = " ".join(settings.ai_system_prompt.split())
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    caps = [f"{settings.llm_daily_budget_usd:g} USD/day all sessions"] if settings.llm_daily_budget_usd else []
    caps += [f"{profile.session_budget_usd:g} USD/day this session"] if profile.session_budget_usd else []
    return (
        f"{who}: model {settings.openrouter_model} (fallbacks: {fallbacks}), {hours}, {knowledge},"
        f" prompt {shown!r}, groups {'yes' if settings.reply_in_groups else 'no'},"
        f" budget {'; '.join(caps) or 'none'}"
    )
