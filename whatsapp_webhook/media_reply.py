"""The customer's media as one LLM turn: content parts in send order, the fixed replies, the history stand-in.

ReplyPipeline asks MediaTurns.compose for every claimed burst that holds media. The whole burst is one
chat-completions user message (a photo then "quanto custa?" is one call, one reply). A file the bot or the
model cannot take, or one that could not be downloaded, becomes a short bracketed text part telling the
model so, beside the burst's usable parts. Only when nothing usable is left (no text, no usable file) does
the customer get a fixed reply: MEDIA_UNSUPPORTED_REPLY when every file was of a kind not understood, else
MEDIA_UNAVAILABLE_REPLY (asking them to send it again or type it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from whatsapp_webhook.logs import MessageLog
from whatsapp_webhook.media import STAND_IN, MediaKind, content_part, kind_of
from whatsapp_webhook.media_fetch import (
    MediaBudget,
    MediaFailure,
    ModelInputKinds,
    await_stored,
    media_wait_seconds,
)
from whatsapp_webhook.metrics import MEDIA_FAILURES
from whatsapp_webhook.store_api import Outcome

if TYPE_CHECKING:
    from whatsapp_webhook.events import IncomingMessage
    from whatsapp_webhook.settings import Settings
    from whatsapp_webhook.store_api import ClaimedMessage, Store


@dataclass(frozen=True, kw_only=True)
class MediaTurn:
    """The user message the LLM gets (text and media parts, in send order) and what history keeps of it."""

    content: list[dict[str, Any]]
    stand_in: list[str]  # the same turn with each file replaced by its fixed stand-in ("[áudio]")
    reserved: int = 0  # bytes of MediaTurns.budget this turn holds: give them back with MediaTurns.done

    def history_text(self, note: str | None) -> str:
        """What later turns see instead of the bytes: the texts, the stand-ins, and the model's note if any."""
        lines = list(self.stand_in)
        if note:
            lines.append(f"(conteúdo da mídia: {note})")
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class MediaRefusal:
    """A fixed reply instead of the LLM: the file's kind is not understood, or the file could not be had."""

    text: str
    outcome: Outcome
    reason: str


def burst_of(claimed: ClaimedMessage) -> tuple[IncomingMessage, ...]:
    return (claimed.message, *claimed.merged)


def has_media(claimed: ClaimedMessage) -> bool:
    return any(m.has_media for m in burst_of(claimed))


def fixed_stand_in(claimed: ClaimedMessage) -> str:
    """The user turn of a burst without the model's note (a reply written before a restart)."""
    lines: list[str] = []
    for m in burst_of(claimed):
        if m.has_media:
            lines.append(STAND_IN[kind_of(m.media_mimetype)])
        if m.text:
            lines.append(m.text)
    return "\n".join(lines)


_WHAT_WAS_SENT = {MediaKind.AUDIO: "um áudio", MediaKind.IMAGE: "uma imagem", MediaKind.PDF: "um PDF"}


def refused_part(reason: MediaFailure, *, kind: MediaKind, mimetype: str | None = None) -> str:
    """The text part the model gets in place of a file it will not see, so its answer can say so."""
    if kind is MediaKind.UNSUPPORTED:
        what = "um vídeo" if (mimetype or "").lower().startswith("video/") else "um arquivo"
    else:
        what = _WHAT_WAS_SENT[kind]
    if reason is MediaFailure.UNSUPPORTED:
        return f"[o cliente enviou {what}, que não consigo {'ouvir' if kind is MediaKind.AUDIO else 'ver'}]"
    if reason is MediaFailure.TOO_LARGE:
        return f"[o cliente enviou {what} grande demais para eu abrir]"
    return f"[o cliente enviou {what} que não está mais disponível]"


class MediaTurns:
    def __init__(self, *, store: Store, settings: Settings, input_kinds: ModelInputKinds | None) -> None:
        self.store = store
        self.settings = settings
        self.input_kinds = input_kinds
        # A claimed message waits for its file while the download is queued or running (retries included).
        self.wait_seconds = media_wait_seconds(settings.media_download_timeout_seconds)
        self.budget = MediaBudget()

    async def done(self, turn: MediaTurn) -> None:
        """The LLM request is over: the turn's files no longer need to be held."""
        await self.budget.release(turn.reserved)

    async def compose(self, claimed: ClaimedMessage, log: MessageLog) -> MediaTurn | MediaRefusal:
        """The burst as one user message; a turn holds its files' bytes in `budget` until done() is called.

        A file that cannot be used (a kind not understood, expired, over the cap) becomes a short text part
        that tells the model so, beside the burst's usable parts: a video then "tem na cor azul?" still gets
        an answer to the question. Only a burst with nothing usable left gets the fixed reply.
        """
        files: dict[str, tuple[MediaKind, int]] = {}  # dedupe key -> kind, stored size
        refused: dict[str, tuple[str, MediaFailure]] = {}  # dedupe key -> the part the model gets, why
        for m in burst_of(claimed):  # every file first: understood, and downloaded
            if not m.has_media:
                continue
            kind = kind_of(m.media_mimetype)
            if kind is MediaKind.UNSUPPORTED or not (
                self.input_kinds is None or await self.input_kinds.understood(kind)
            ):
                failure = MediaFailure.UNSUPPORTED
            elif m.media_error is not None:
                failure = MediaFailure(m.media_error)
            else:
                stored = await await_stored(self.store, m.dedupe_key, wait_seconds=self.wait_seconds)
                if stored.failure is None:
                    files[m.dedupe_key] = (kind, stored.size)
                    continue
                failure = stored.failure
            self._count_refusal(failure, log, kind=kind, mimetype=m.media_mimetype)
            refused[m.dedupe_key] = (refused_part(failure, kind=kind, mimetype=m.media_mimetype), failure)
        if not files and not any(m.text for m in burst_of(claimed)):
            # Asking to send it again only helps a file that could not be had, not one of a kind never understood.
            unavailable = [failure for _, failure in refused.values() if failure is not MediaFailure.UNSUPPORTED]
            return self._fixed_reply(unavailable[0] if unavailable else MediaFailure.UNSUPPORTED)
        # The whole burst at once: two replies each holding part of the budget never wait for each other.
        reserved = sum(size for _, size in files.values())
        await self.budget.reserve(reserved)
        try:
            content: list[dict[str, Any]] = []
            stand_in: list[str] = []
            for m in burst_of(claimed):
                if m.dedupe_key in files:
                    kind = files[m.dedupe_key][0]
                    blob = await asyncio.to_thread(self.store.get_media, m.dedupe_key)
                    if blob is None:  # pruned meanwhile: say so, as for any file that could not be had
                        self._count_refusal(MediaFailure.LOST, log, kind=kind, mimetype=m.media_mimetype)
                        refused[m.dedupe_key] = (refused_part(MediaFailure.LOST, kind=kind), MediaFailure.LOST)
                    else:
                        content.append(
                            content_part(kind, mimetype=blob.mimetype, data=blob.data, filename=m.media_filename)
                        )
                        stand_in.append(STAND_IN[kind])
                if m.dedupe_key in refused:
                    words = refused[m.dedupe_key][0]
                    content.append({"type": "text", "text": words})
                    stand_in.append(words)
                if m.text:
                    content.append({"type": "text", "text": m.text})
                    stand_in.append(m.text)
        except BaseException:
            await asyncio.shield(self.budget.release(reserved))
            raise
        return MediaTurn(content=content, stand_in=stand_in, reserved=reserved)

    def _count_refusal(self, reason: MediaFailure, log: MessageLog, *, kind: MediaKind, mimetype: str | None) -> None:
        MEDIA_FAILURES.labels(str(reason)).inc()
        log.info(
            "decision=%(decision)s kind=%(kind)s reason=%(reason)s mimetype=%(mimetype)s",
            {
                "decision": "media_unsupported" if reason is MediaFailure.UNSUPPORTED else "media_unavailable",
                "kind": str(kind),
                "reason": str(reason),
                "mimetype": (mimetype or "")[:60],
            },
        )

    def _fixed_reply(self, reason: MediaFailure) -> MediaRefusal:
        if reason is MediaFailure.UNSUPPORTED:
            return MediaRefusal(
                text=self.settings.media_unsupported_reply, outcome=Outcome.MEDIA_UNSUPPORTED, reason=str(reason)
            )
        return MediaRefusal(
            text=self.settings.media_unavailable_reply, outcome=Outcome.MEDIA_UNAVAILABLE, reason=str(reason)
        )
