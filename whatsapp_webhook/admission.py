"""Whether a claimed message gets an answer now, and the turns the LLM sees with it.

The dispatcher asks for this inside the claim's transaction (Store.claim_due's `admit`): one write
transaction and one thread hop less per reply, on the path every message takes. `request` is the one
place that says which claims need an admission and what it reads, so the claim and the pipeline agree.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from whatsapp_webhook.media_reply import has_media
from whatsapp_webhook.policy import trim_history
from whatsapp_webhook.store_api import Admission, AdmissionRequest, ChatLimits, InboxStatus, Outcome, Turn, Verdict

if TYPE_CHECKING:
    from whatsapp_webhook.business import BusinessProfiles
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import ClaimedMessage, Store

# The commands whose answer never depends on the limits (an opt-out must always get through).
UNLIMITED_COMMANDS = ("stop", "start")


@dataclass(frozen=True, kw_only=True)
class AdmittedChat:
    """Whether the chat gets an answer now, and (if so) the recent turns the LLM should see."""

    admission: Admission
    history: list[Turn]


def is_mid_send(claimed: ClaimedMessage) -> bool:
    """An earlier attempt began sending this message's reply (maybe a part of it went out)."""
    return claimed.previous_status is InboxStatus.SENDING or claimed.parts_sent > 0


def written_reply(claimed: ClaimedMessage) -> str | None:
    """The reply an earlier attempt wrote, which this one must send word for word; None: write a new one.
    A reply whose sending began is kept as written; only an unsent fallback is written again."""
    return claimed.reply_text if claimed.outcome is not Outcome.FALLBACK or is_mid_send(claimed) else None


def is_worn_out(claimed: ClaimedMessage, *, max_attempts: int) -> bool:
    """Taken more than REPLY_MAX_ATTEMPTS times with no attempt ending, and nothing sent yet: given up."""
    return claimed.attempts > max_attempts and not is_mid_send(claimed)


class ChatAdmission:
    """Asks the store whether a chat is answered now (pause, opt-out, loops, rate limits) and for its turns."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        profiles: BusinessProfiles,
        media_on: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.profiles = profiles
        self.media_on = media_on
        self.clock = clock
        self.limits = ChatLimits(
            per_minute=settings.rate_limit_per_minute,
            per_day=settings.daily_message_limit,
            loop_repeats=settings.loop_repeats,
            loop_window=settings.loop_window_seconds,
            loop_pause=settings.loop_pause_minutes * 60,
        )
        # How far back a chat's history reaches, and at most how many rows (a turn is a user and an assistant row).
        self.history_seconds = settings.history_ttl_minutes * 60
        self.history_rows = settings.history_turns * 2

    def prepare(self) -> None:
        """Before a claim, on its thread: SESSIONS_FILE, if it changed, is read now, so `request` (inside the
        claim's write lock) usually finds the profiles in memory; a claim that waits for the lock longer than
        the file's check interval (1 s) may still look at the file from inside it."""
        self.profiles.profile("default")  # any session's lookup rereads a changed file

    def request(self, claimed: ClaimedMessage) -> AdmissionRequest | None:
        """What the claim should decide for `claimed`, or None when its reply asks no admission: a reply
        already written, one given up (REPLY_MAX_ATTEMPTS), stop/start, a disabled session.

        Runs inside the claim's transaction, on whichever thread commits it (with SQLite's group commit, maybe a
        request thread): plain values only (see `prepare`).
        """
        settings, message = self.settings, claimed.message
        if written_reply(claimed) is not None:
            return None
        if is_worn_out(claimed, max_attempts=settings.reply_max_attempts):
            return None
        command = settings.command_of(message.text)
        if command in UNLIMITED_COMMANDS or not self.profiles.profile(message.session).enabled:
            return None
        wants_history = self._wants_history(claimed, command)
        return AdmissionRequest(
            texts=claimed.texts,
            limits=self.limits,
            history_seconds=self.history_seconds if wants_history else 0.0,
            history_turns=self.history_rows if wants_history else 0,
        )

    async def admitted(self, claimed: ClaimedMessage, command: str | None) -> AdmittedChat:
        """The admission the claim decided, or (a claim made without `request`) one decided now."""
        if claimed.admission is not None:
            history = trim_history(claimed.history, max_chars=self.settings.history_max_chars)
            return AdmittedChat(admission=claimed.admission, history=history)
        return await asyncio.to_thread(self._admit, claimed, command)

    def _admit(self, claimed: ClaimedMessage, command: str | None) -> AdmittedChat:
        """One trip to a store thread, two transactions (the history read stays outside the write lock)."""
        settings, chat_key = self.settings, claimed.message.chat_key
        admission = self.store.admit(chat_key, texts=claimed.texts, limits=self.limits)
        if admission.verdict is not Verdict.OK or not self._wants_history(claimed, command):
            return AdmittedChat(admission=admission, history=[])
        turns = self.store.history(chat_key, since=self.clock() - self.history_seconds, limit=self.history_rows)
        return AdmittedChat(admission=admission, history=trim_history(turns, max_chars=settings.history_max_chars))

    def _wants_history(self, claimed: ClaimedMessage, command: str | None) -> bool:
        """A reset starts afresh; a burst with nothing the LLM reads (no text, no media it gets) needs none."""
        readable = bool(claimed.texts) or (self.media_on and has_media(claimed))
        return readable and command != "reset" and self.settings.history_turns > 0
