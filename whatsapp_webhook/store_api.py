"""What the rest of the server asks of the state store: the interface, its records and its states.

`Store` is the interface the webhook service, the dispatcher and the reply pipeline use; `StateStore`
(SQLite, store.py) implements it, and tests/test_store_contract.py is the behavioural suite every
backend must pass unchanged. Every method that changes state is one atomic step: two workers, or two
hosts, can never both pass a limit, claim the same message or send the same reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from whatsapp_webhook.customer_data import ChatExport, ForgetReport
    from whatsapp_webhook.events import IncomingMessage
    from whatsapp_webhook.health import CheckStatus, HealthCheck


class StoreUnavailable(Exception):
    """The state store could not be read or written."""

    # What /health says about it: for the operator, without paths or secrets. The server log has the detail.
    health_reason = (
        "the state store cannot take writes: new messages get 503 so WAHA redelivers them (see the server log)"
    )


class StoreFull(StoreUnavailable):
    """The disk (or the database's size limit) is full: nothing new can be written until space returns."""

    health_reason = (
        "the state store's disk is full: new messages get 503 so WAHA redelivers them; free space and the "
        "server carries on by itself (docs/problemas.md)"
    )


class StateFileLost(StoreUnavailable):
    """The SQLite state file was deleted or replaced while the server ran: writing on would split the state."""

    health_reason = (
        "the state file (STATE_DB) was deleted or replaced while the server ran: new messages get 503; put the "
        "file back or restart the server (docs/problemas.md)"
    )


# last_error of a message given up because its reply went to sendText REPLY_MAX_SENDS times.
SENDS_SPENT_ERROR = "sent REPLY_MAX_SENDS times without WAHA confirming delivery: given up"


class InboxStatus(StrEnum):
    QUEUED = "queued"  # waiting for its turn (new, retrying, or handed back)
    PROCESSING = "processing"  # a worker holds its lease and is writing the reply
    SENDING = "sending"  # the reply is being sent: whoever takes it over asks WAHA what already left
    MERGED = "merged"  # part of a burst answered by another message's reply
    DONE = "done"
    FAILED = "failed"  # given up after every attempt


# Store.mark_once's marks outlive any closed period (a long holiday included), then prune forgets them.
CHAT_MARKS_KEPT_SECONDS = 35 * 86_400

OPEN_STATUSES = (InboxStatus.QUEUED, InboxStatus.PROCESSING, InboxStatus.SENDING, InboxStatus.MERGED)
FINISHED_STATUSES = (InboxStatus.DONE, InboxStatus.FAILED)


class Outcome(StrEnum):
    """What a finished message got."""

    SUCCESS = "success"  # the LLM's answer
    FALLBACK = "fallback"  # FALLBACK_MESSAGE: the LLM could not answer
    COMMAND = "command"  # the reply to a chat command (reset, stop, start)
    NON_TEXT = "non_text"  # NON_TEXT_REPLY
    NOTICE = "notice"  # the "too many messages" notice
    SKIPPED = "skipped"  # deliberately left unanswered (paused, opted out, loop, over a limit)
    MERGED = "merged"  # answered by the reply of the burst it was merged into
    MEDIA_UNSUPPORTED = "media_unsupported"  # MEDIA_UNSUPPORTED_REPLY: a kind the bot or the model cannot take
    MEDIA_UNAVAILABLE = "media_unavailable"  # MEDIA_UNAVAILABLE_REPLY: the file could not be had


class Verdict(StrEnum):
    """Whether a chat may get a reply now (policy.admission_verdict decides)."""

    OK = "ok"
    PAUSED = "paused"
    OPTED_OUT = "opted_out"
    RATE_LIMITED = "rate_limited"
    DAILY_CAP = "daily_cap"
    LOOP = "loop"


class SendVerdict(StrEnum):
    """The last check before sendText (policy.send_verdict decides)."""

    SEND = "send"
    YIELD = "yield"  # an earlier message of the chat showed up: it goes first
    PAUSED = "paused"  # a person took the chat over while the reply was being written
    LOST = "lost"  # the lease went to another worker
    SPENT = "spent"  # sent REPLY_MAX_SENDS times already: given up (failed), never sent again


class FailureVerdict(StrEnum):
    RETRY = "retry"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True, kw_only=True)
class Acceptance:
    """What the inbox did with a delivery: stored it, woke a failed one up for retry, or saw a duplicate."""

    stored: bool
    status: InboxStatus
    attempts: int


@dataclass(frozen=True, kw_only=True)
class ClaimedMessage:
    """A message this worker now owns until `lease_owner`'s lease runs out, with the burst merged into it."""

    message: IncomingMessage
    lease_owner: str
    previous_status: InboxStatus  # SENDING means an earlier attempt may already have sent (part of) the reply
    attempts: int
    reply_text: str | None
    outcome: Outcome | None
    send_started_at: float | None
    received_at: float
    parts_sent: int = 0
    merged: tuple[IncomingMessage, ...] = ()
    # Decided in the claim's own transaction when the dispatcher asked (claim_due's `admit`), else None.
    admission: Admission | None = None
    history: tuple[Turn, ...] = ()  # the chat's latest turns, oldest first, when admitted and asked for

    @property
    def texts(self) -> list[str]:
        """What the customer wrote, in order: this message and the ones typed right after it."""
        return [m.text for m in (self.message, *self.merged) if m.text]


@dataclass(frozen=True, kw_only=True)
class InboxEntry:
    status: InboxStatus
    attempts: int
    outcome: Outcome | None
    sent_message_id: str | None
    last_error: str | None
    merged_into: str | None


@dataclass(frozen=True, kw_only=True)
class Admission:
    """Whether a chat may get a reply now; `notice` says the customer should be told once why not."""

    verdict: Verdict
    notice: bool = False


@dataclass(frozen=True, kw_only=True)
class ChatLimits:
    """How much one chat may ask: replies per minute and per day, and what counts as a bot-to-bot loop."""

    per_minute: int
    per_day: int
    loop_repeats: int
    loop_window: float  # seconds
    loop_pause: float  # seconds
    notice_every: float = 3600.0  # the "too many messages" notice, at most this often


@dataclass(frozen=True, kw_only=True)
class AdmissionRequest:
    """What claim_due should decide for a message it claims, in the claim's transaction: the chat's
    admission (as `admit`) and, when admitted, its latest turns (as `history`). One write less per reply."""

    texts: list[str]
    limits: ChatLimits
    history_seconds: float = 0.0  # how far back history reaches; 0 with history_turns 0: none wanted
    history_turns: int = 0  # at most this many rows


@dataclass(frozen=True, kw_only=True)
class Turn:
    """One turn of a conversation as the LLM sees it."""

    role: str  # user | assistant
    content: str


@dataclass(frozen=True, kw_only=True)
class StoreSnapshot:
    """Counters and the state of open messages and chats, read at one moment (for /stats and /health)."""

    counters: Mapping[str, int]
    by_status: Mapping[str, int]  # open messages by InboxStatus
    retrying: int  # queued again after a failed attempt
    paused: Mapping[str, int]  # paused chats by reason
    opted_out: int
    media_bytes: int = 0
    chats: int = 0  # chats the store remembers anything about (pruned once nothing is active)


@dataclass(frozen=True, kw_only=True)
class MediaBlob:
    """Bytes kept for a message (a voice note, a photo) until the message is finished or pruned."""

    key: str  # the message's dedupe key
    mimetype: str
    data: bytes = field(repr=False)
    created_at: float


class MediaJobState(StrEnum):
    """Where a message's file is on its way into the store (the media queue, apart from the reply queue)."""

    PENDING = "pending"  # to be downloaded (new, or again after a transient failure)
    FETCHING = "fetching"  # a worker is downloading it under a lease
    STORED = "stored"  # the bytes are in the store (get_media)
    FAILED = "failed"  # the file cannot be had: `reason` says why


@dataclass(frozen=True, kw_only=True)
class MediaJob:
    """A file to download for a message, claimed by one worker until its lease runs out."""

    key: str  # the message's dedupe key
    url: str  # media.url as WAHA sent it (media.media_source decides where it is really fetched)
    mimetype: str
    attempts: int


@dataclass(frozen=True, kw_only=True)
class MediaJobStatus:
    state: MediaJobState
    reason: str | None = None
    attempts: int = 0
    size: int = 0  # the stored file's bytes (STORED)


class Store(Protocol):
    """Everything the webhook service, the dispatcher and the reply pipeline ask of the state store."""

    def initialize(self) -> None: ...
    def close(self) -> None: ...
    def ping(self) -> None: ...
    def count(self, name: str, amount: int = 1) -> None: ...
    def count_many(self, amounts: Mapping[str, int]) -> None: ...

    # The webhook side
    def accept(self, message: IncomingMessage) -> Acceptance: ...
    def entry(self, key: str) -> InboxEntry | None: ...

    # The worker side: claims, leases, sends
    # How many claims a dispatcher makes one after the other on its store thread, without going back to the
    # loop between them, while they come back full (worker.Dispatcher._claim_due).
    claims_in_a_row: int

    def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        debounce_seconds: float = 0.0,
        mergeable: Callable[[IncomingMessage], bool] = ...,
        admit: Callable[[ClaimedMessage], AdmissionRequest | None] = ...,  # called in the transaction
    ) -> list[ClaimedMessage]: ...
    def renew_leases(self, keys: Iterable[str], owner: str, *, lease_seconds: float) -> int: ...
    def begin_send(
        self,
        key: str,
        owner: str,
        *,
        parts: list[str],
        reply: tuple[str, Outcome] | None = None,
        llm_cost_usd: float = 0.0,
        max_sends: int | None = None,
    ) -> SendVerdict: ...
    def mark_part_sent(self, key: str, owner: str, *, parts_sent: int, sent_message_id: str | None) -> bool: ...
    def finish(
        self,
        key: str,
        owner: str,
        *,
        outcome: Outcome,
        sent_message_id: str | None,
        history: tuple[Turn, Turn] | None = None,
        last_part_id: str | None = None,
        counts: Mapping[str, int] | None = None,  # added with the finish, only if it takes effect
    ) -> bool: ...  # True when it took effect (this call finished the message)
    def record_failure(
        self, key: str, owner: str, error: str, *, max_attempts: int, retry_in: float
    ) -> FailureVerdict: ...
    def release(self, key: str, owner: str) -> None: ...
    def expire_leases(self, *, only_run_out: bool = False) -> int: ...
    def prune(self, *, older_than: float, history_older_than: float) -> int: ...

    # Conversations and chats
    def history(self, chat_key: str, *, since: float, limit: int) -> list[Turn]: ...
    def clear_history(self, chat_key: str) -> None: ...
    def pause_chat(self, chat_key: str, *, until: float, reason: str) -> None: ...
    def set_opted_out(self, chat_key: str, opted_out: bool) -> bool: ...
    def known_sent_ids(self, message_ids: list[str]) -> set[str]: ...
    def is_our_message(self, chat_key: str, *, message_id: str | None, text: str | None, within: float) -> bool: ...
    def admit(self, chat_key: str, *, texts: list[str], limits: ChatLimits) -> Admission: ...
    def mark_once(self, chat_key: str, name: str, value: str) -> bool: ...
    def read_counters(self, names: Iterable[str]) -> dict[str, int]: ...

    # A customer's data on request (LGPD): everything about one chat, and forgetting it
    def export_chat(self, chat_key: str) -> ChatExport: ...
    def forget_chat(self, chat_key: str) -> ForgetReport: ...

    # Media bytes, kept until the message is finished or pruned
    def put_media(self, key: str, *, mimetype: str, data: bytes) -> None: ...
    def get_media(self, key: str) -> MediaBlob | None: ...
    # The media queue: accept() queues a message's file when it has a media.url; workers download it
    def claim_media_jobs(self, owner: str, *, limit: int, lease_seconds: float) -> list[MediaJob]: ...
    def store_media_job(self, key: str, owner: str, *, mimetype: str, data: bytes, max_total_bytes: int) -> bool: ...
    def fail_media_job(self, key: str, owner: str, *, reason: str, retry_in: float | None = None) -> None: ...
    def media_job(self, key: str) -> MediaJobStatus | None: ...

    # Reporting and health
    def snapshot(self) -> StoreSnapshot: ...
    def set_health(self, name: str, status: CheckStatus, reason: str, *, max_parts: int = 200) -> None: ...
    def health_reports(self) -> dict[str, HealthCheck]: ...
