"""What the bot knows about the business it answers for: its prompt, its knowledge, its opening hours.

A SessionProfile is one WAHA session's (one WhatsApp number's) effective configuration; BusinessProfiles
gives the pipeline the profile of a message's session. The prompt is laid out for providers' prompt caching:
the stable part (system prompt and knowledge) first, the turns next, and what changes every minute (the date
and whether the business is open) last, just before the customer's message."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from whatsapp_webhook.hours import HoursStatus, Schedule, build_schedule, hours_status, notice_text, prompt_note
from whatsapp_webhook.knowledge import KnowledgeBase

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import Turn

OUT_OF_HOURS_MARK = "out_of_hours_notice"  # Store.mark_once's name for "this closed period's notice went out"


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


@dataclass(kw_only=True)
class SessionProfile:
    """One WhatsApp number's effective configuration, with its parsed hours and its knowledge files."""

    name: str
    settings: Settings
    schedule: Schedule
    knowledge: KnowledgeBase
    _system: tuple[int, str] = field(default=(-1, ""), repr=False)

    @classmethod
    def of(cls, name: str, settings: Settings, *, clock: Callable[[], float] | None = None) -> SessionProfile:
        """Build from (already validated) settings."""
        schedule = build_schedule(
            settings.business_hours, timezone=settings.business_timezone, holidays=settings.business_holidays
        )
        knowledge = (
            KnowledgeBase(settings.ai_knowledge_file, settings.ai_knowledge_max_chars, clock=clock)
            if clock is not None
            else KnowledgeBase(settings.ai_knowledge_file, settings.ai_knowledge_max_chars)
        )
        return cls(name=name, settings=settings, schedule=schedule, knowledge=knowledge)

    def hours(self, now: float) -> HoursStatus:
        return hours_status(self.schedule, now)

    def system_prompt(self) -> str:
        """The stable part: AI_SYSTEM_PROMPT, then the knowledge (rebuilt only when the knowledge changed)."""
        section = self.knowledge.section()
        version, text = self._system
        if version != self.knowledge.version or not text:
            text = self.settings.ai_system_prompt + (f"\n\n{section}" if section else "")
            self._system = (self.knowledge.version, text)
        return text

    def prompt(self, status: HoursStatus, history: list[Turn], user_turn: str) -> list[dict[str, str]]:
        """The chat completion's messages: stable system part, turns, this minute's hours note, the customer."""
        messages = [{"role": "system", "content": self.system_prompt()}]
        messages.extend({"role": turn.role, "content": turn.content} for turn in history)
        if not self.schedule.always_open:
            messages.append({"role": "system", "content": prompt_note(self.schedule, status)})
        messages.append({"role": "user", "content": user_turn})
        return messages

    def notice(self, status: HoursStatus) -> str:
        return notice_text(self.settings.out_of_hours_notice, self.schedule, status)


class BusinessProfiles:
    """The profile of each WAHA session. Today every session shares the global settings' profile."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._default = SessionProfile.of("*", settings)

    def profile(self, session: str) -> SessionProfile:
        return self._default
