"""Store benchmark: the CPU one reply costs in the state store, call by call, on each backend.

    .venv/bin/python -m bench.store_bench                      # SQLite and PostgreSQL, about a minute
    .venv/bin/python -m bench.store_bench --store postgresql --messages 500 --rounds 3

One thread drives the store the way one reply does (store.StateStore on a temporary file, pg_store.PostgresStore
on a throwaway server of fakes/postgres_server.py): accept (the webhook), claim_due with an admission and
history (the dispatcher), begin_send and finish (the pipeline), for `--messages` messages from as many chats.
Each call's process CPU time is summed per kind of call; each round uses new messages, and the median round is
printed in microseconds per call. No gunicorn, no HTTP, no other process on the client side: what it shows is
the store's own cost (the PostgreSQL server's CPU is not in it), steady enough to compare two commits side by
side (git worktree), where the whole-server bench (bench/run_bench.py) cannot see a tenth of a millisecond.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fakes import waha_payloads as wp
from fakes.postgres_server import PostgresServer, PostgresUnavailable
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.pg_store import PostgresStore
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import AdmissionRequest, ChatLimits, ClaimedMessage, Outcome, Turn
from whatsapp_webhook.worker import CLAIM_BATCH

CALLS = ("accept", "claim_due", "begin_send", "finish")
LIMITS = ChatLimits(per_minute=100_000, per_day=1_000_000, loop_repeats=1000, loop_window=60.0, loop_pause=600.0)
OWNER = "store-bench"


def incoming(n: int) -> IncomingMessage:
    envelope = wp.text_message(
        "WEBJS", sender=f"55119{n + 100_000:08d}@c.us", body=f"Oi, pedido {n}", message_id=f"3EB0{n:016X}"
    )
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage), message
    return message


def admit(claimed: ClaimedMessage) -> AdmissionRequest:
    return AdmissionRequest(texts=claimed.texts, limits=LIMITS, history_seconds=3600.0, history_turns=20)


class Tally:
    def __init__(self) -> None:
        self.cpu = dict.fromkeys(CALLS, 0.0)
        self.calls = dict.fromkeys(CALLS, 0)

    @contextmanager
    def timed(self, name: str, calls: int = 1) -> Iterator[None]:
        start = time.process_time()
        yield
        self.cpu[name] += time.process_time() - start
        self.calls[name] += calls

    def per_call_us(self) -> dict[str, float]:
        return {name: self.cpu[name] / max(1, self.calls[name]) * 1e6 for name in CALLS}


def one_round(store: Any, messages: list[IncomingMessage], *, claim_batch: int) -> Tally:
    """Every message accepted, claimed (in batches, as the dispatcher does), begun and finished."""
    tally = Tally()
    for message in messages:
        with tally.timed("accept"):
            store.accept(message)
    claimed: list[ClaimedMessage] = []
    while len(claimed) < len(messages):
        with tally.timed("claim_due", 0):
            batch = store.claim_due(OWNER, limit=claim_batch, lease_seconds=60.0, admit=admit)
        tally.calls["claim_due"] += len(batch)  # per claimed message: the batch shares one transaction
        if not batch:
            raise RuntimeError("claim_due found nothing due: the store lost a message")
        claimed += batch
    for item in claimed:
        key = item.message.dedupe_key
        reply = f"Recebemos o pedido {key[-4:]}, obrigado!"
        with tally.timed("begin_send"):
            store.begin_send(key, OWNER, parts=[reply], reply=(reply, Outcome.SUCCESS), llm_cost_usd=0.0001)
        with tally.timed("finish"):
            finished = store.finish(
                key,
                OWNER,
                outcome=Outcome.SUCCESS,
                sent_message_id=f"true_{item.message.chat_id}_{key[-8:]}",
                history=(Turn(role="user", content=item.message.text or ""), Turn(role="assistant", content=reply)),
                last_part_id=f"true_{item.message.chat_id}_{key[-8:]}",
                counts={f"session:{item.message.session}:messages_processed": 1},
            )
        if not finished:
            raise RuntimeError(f"finish refused {key}: the lease was lost")
    return tally


def measure(
    name: str, make_store: Callable[[], Any], *, messages: int, rounds: int, claim_batch: int
) -> dict[str, float]:
    store = make_store()
    store.initialize()
    try:
        one_round(store, [incoming(n) for n in range(200)], claim_batch=claim_batch)  # warm: caches, prepared plans
        results = [
            one_round(store, [incoming((r + 1) * messages + n + 200) for n in range(messages)], claim_batch=claim_batch)
            for r in range(rounds)
        ]
    finally:
        store.close()
    median = {call: statistics.median(t.per_call_us()[call] for t in results) for call in CALLS}
    median["reply"] = sum(median[call] for call in CALLS)
    spread = [sum(t.per_call_us().values()) for t in results]
    print(
        f"{name:<11} "
        + "  ".join(f"{call} {median[call]:6.0f}" for call in CALLS)
        + f"  | one reply {median['reply']:6.0f} µs CPU (rounds: {', '.join(f'{s:.0f}' for s in spread)})"
    )
    return median


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="both", choices=("sqlite", "postgresql", "both"))
    p.add_argument("--messages", type=int, default=1000, help="messages per round (each from its own chat)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--claim-batch", type=int, default=CLAIM_BATCH, help="messages per claim (worker.CLAIM_BATCH)")
    a = p.parse_args(argv)
    print(
        f"store bench: {a.messages} messages per round, {a.rounds} rounds, claims of {a.claim_batch}; "
        "median round, µs of this process's CPU per call (claim_due: per claimed message)"
    )
    sizes = {"messages": a.messages, "rounds": a.rounds, "claim_batch": a.claim_batch}
    if a.store in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
            measure("SQLite", lambda: StateStore(str(Path(folder) / "state.db")), **sizes)
    if a.store in ("postgresql", "both"):
        try:
            server = PostgresServer.start()
        except PostgresUnavailable as exc:
            print(f"PostgreSQL: not measured ({exc})", file=sys.stderr)
            return 1
        try:
            measure("PostgreSQL", lambda: PostgresStore(server.create_database("store_bench")), **sizes)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
