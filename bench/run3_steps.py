"""Where run 3's time goes, chat by chat: each step of a reply, from the fakes' request logs and the inbox's
arrival times (the ones the floor replays).

For every chat, message k (0-based) of the run:
- k = 0: recorded by our server -> its LLM request reached the fake LLM (claim, admission, the loop's start);
- every k: the fake LLM answered (request + its latency) -> the reply's sendText reached the fake WAHA;
- k > 0: the previous reply's sendText was answered (or this message recorded, if later) -> this message's LLM
  request (the chat's turn passing on).

A perfect server spends ~0 ms in each. The steps' p50 / p90 are printed under run 3, so a change that moves
the floor ratio shows which step it moved (bench/README.md, "Where the time went", was measured this way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FIRST_REQUEST = "recorded → LLM request (1st message)"
TO_SEND = "LLM answer → sendText"
NEXT_TURN = "sendText answered → next message's LLM request"
STEPS = (FIRST_REQUEST, TO_SEND, NEXT_TURN)


def _tokens(text: object, tag: str) -> list[int]:
    return [int(n) for n in re.findall(rf"#{re.escape(tag)}-(\d{{6}})", text if isinstance(text, str) else "")]


def _llm_tokens(body: Any, tag: str) -> list[int]:
    """The bench tokens of the message being answered: the last user turn (earlier turns are history)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return []
    content = users[-1].get("content")
    if isinstance(content, list):  # multimodal parts
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return _tokens(content, tag)


def first_calls(
    records: Iterable[Mapping[str, Any]], *, tag: str, since: float
) -> tuple[dict[int, float], dict[int, float]]:
    """From the fakes' JSONL records (either log, or both): when each token's earliest LLM request arrived and
    its earliest accepted sendText (201), as wall times at or after `since`. Earliest, not first in the file: a
    fake writes its record after answering, so a timed-out attempt is logged after its retry."""
    llm: dict[int, float] = {}
    sends: dict[int, float] = {}
    for record in records:
        at = float(record.get("t_wall", 0.0))
        if at < since:
            continue
        if record.get("path") == "/api/v1/chat/completions":
            for token in _llm_tokens(record.get("body"), tag):
                llm[token] = min(at, llm.get(token, at))
        elif record.get("path") == "/api/sendText" and record.get("status") == 201:
            body = record.get("body")
            for token in _tokens(body.get("text") if isinstance(body, dict) else None, tag):
                sends[token] = min(at, sends.get(token, at))
    return llm, sends


def read_log(path: Path) -> list[dict[str, Any]]:
    """A fake's complete records; a last line still being written (no newline yet) is left out."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def per_chat_steps(
    arrivals: Mapping[tuple[int, int], float],
    llm: Mapping[int, float],
    sends: Mapping[int, float],
    *,
    t0: float,
    chats: int,
    per_chat: int,
    llm_latency: float,
    waha_latency: float,
) -> dict[str, list[float]]:
    """Each step's durations in ms over every message whose times are all known. `arrivals` are seconds after
    t0, keyed (chat, k) as bench.run_bench.server_arrivals gives them; token n is chat n % chats, message
    n // chats (write_messages writes wave by wave)."""
    steps: dict[str, list[float]] = {name: [] for name in STEPS}
    for chat in range(chats):
        for k in range(per_chat):
            token = k * chats + chat
            asked, sent = llm.get(token), sends.get(token)
            if asked is None:
                continue
            if sent is not None:
                steps[TO_SEND].append(1000 * (sent - (asked + llm_latency)))
            if k == 0 and (recorded := arrivals.get((chat, 0))) is not None:
                steps[FIRST_REQUEST].append(1000 * (asked - (t0 + recorded)))
            if k > 0 and (previous := sends.get(token - chats)) is not None:
                ready = previous + waha_latency  # the chat's turn passes on when the last reply was answered...
                if (recorded := arrivals.get((chat, k))) is not None:
                    ready = max(ready, t0 + recorded)  # ...unless this message reached us only after that
                steps[NEXT_TURN].append(1000 * (asked - ready))
    return steps
