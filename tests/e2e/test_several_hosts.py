"""Two hosts, one PostgreSQL: two gunicorn servers on different ports share one real database, and a sender
spreads 500 messages from 100 chats over both, with copies of some messages delivered to the other host too.

Like WAHA in front of a load balancer (or with both webhook URLs), the sender delivers each chat's messages
in order, retries anything that was not a 2xx, and fails over to the other host when one does not answer.
Each test breaks something mid-burst (kill -9 of a host, a PostgreSQL restart, a host restart) and then
checks what the customers got: every message answered exactly once, in order per chat.

The database server is this module's own (fakes/postgres_server.py), so restarting it disturbs no other test.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from fakes import FakeOpenRouter, FakeWaha
from fakes import waha_payloads as wp
from fakes.gunicorn_server import REPO, GunicornServer
from fakes.postgres_server import PostgresServer
from tests import postgres
from tests.e2e.test_gunicorn import deliver, stats, wait_for

pytestmark = pytest.mark.e2e

CHATS, TURNS = 100, 5  # 500 messages
DUPLICATE_SHARE = 0.3  # of the messages also delivered to the other host, at the same moment
# Short leases so a dead host's messages are taken over in seconds; a short sync wait so the sender's
# threads are not held while replies are written (the reply goes out either way).
HOST_ENV = {"LEASE_SECONDS": "3", "WEBHOOK_SYNC_WAIT_SECONDS": "0.2", "WAHA_TIMEOUT_SECONDS": "3",
            "LLM_TIMEOUT_SECONDS": "5", "LLM_DEADLINE_SECONDS": "10", "REPLY_RETRY_SECONDS": "1",
            "REPLY_MAX_ATTEMPTS": "10", "STATE_DB_TIMEOUT_SECONDS": "2", "GUNICORN_GRACEFUL_TIMEOUT": "15",
            "GUNICORN_THREADS": "16"}


@pytest.fixture(scope="module")
def database_server() -> Iterator[PostgresServer]:
    yield from postgres.private_server()


_databases = iter(range(1, 1000))


@pytest.fixture
def two_hosts(start_server: Callable[..., GunicornServer],
              database_server: PostgresServer) -> Callable[..., tuple[GunicornServer, GunicornServer]]:
    """Two servers ("host A" and "host B") on one new database of the module's PostgreSQL server."""

    def start(**env: str) -> tuple[GunicornServer, GunicornServer]:
        url = database_server.create_database(f"hosts{next(_databases)}")
        return start_server(**{**HOST_ENV, "STATE_DB": url, **env}), start_server(**{**HOST_ENV, "STATE_DB": url,
                                                                                    **env})

    return start


def body_of(chat: str, turn: int) -> str:
    return f"{chat[:13]} pergunta {turn}"


@dataclass
class Sender:
    """WAHA in front of two hosts: per chat in order, a copy of some messages to the other host, and a retry
    (on the other host) of anything that was not a 2xx."""

    hosts: tuple[GunicornServer, GunicornServer]
    seed: int = 19
    statuses: collections.Counter[Any] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _note(self, what: Any) -> None:
        with self.lock:
            self.statuses[what] += 1

    def deliver_until_taken(self, envelope: dict, first: int, deadline: float) -> None:
        host = first
        while time.monotonic() < deadline:
            try:
                response = deliver(self.hosts[host], envelope)
            except httpx.HTTPError:
                self._note("no answer")
            else:
                self._note(response.status_code)
                if response.status_code in (200, 202):
                    return
            host = 1 - host  # the other host (WAHA's other URL, or the load balancer's next server)
            time.sleep(0.1)
        raise AssertionError(f"{envelope['payload']['body']!r} was never taken by either host")

    def send_chat(self, chat: str, rng: random.Random, copies: concurrent.futures.Executor,
                  deadline: float) -> list[concurrent.futures.Future[None]]:
        base = int(time.time())
        pending = []
        for turn in range(TURNS):
            envelope = wp.text_message("NOWEB", sender=chat, body=body_of(chat, turn),
                                       message_id=f"3EB0{rng.getrandbits(72):018X}", timestamp=base + turn)
            host = rng.randrange(2)
            if rng.random() < DUPLICATE_SHARE:
                pending.append(copies.submit(self.deliver_until_taken, envelope, 1 - host, deadline))
            self.deliver_until_taken(envelope, host, deadline)
        return pending

    def send_all(self, chats: list[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        rngs = [random.Random(self.seed * 1000 + n) for n in range(len(chats))]
        with concurrent.futures.ThreadPoolExecutor(max_workers=40) as copies, \
                concurrent.futures.ThreadPoolExecutor(max_workers=len(chats)) as senders:
            per_chat = list(senders.map(lambda n: self.send_chat(chats[n], rngs[n], copies, deadline),
                                        range(len(chats))))
            for future in (f for futures in per_chat for f in futures):
                future.result()


def chats() -> list[str]:
    return [f"55119{n:08d}@c.us" for n in range(100, 100 + CHATS)]


def when_delivered(fake_waha: FakeWaha, count: int, action: Callable[[], None]) -> threading.Thread:
    """Run `action` once the customers have got `count` replies (the fault lands mid-burst)."""

    def watch() -> None:
        wait_for(lambda: len(fake_waha.delivered_texts()) >= count, timeout=120)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_every_message_answered_once_in_order(fake_waha: FakeWaha) -> None:
    wait_for(lambda: len(fake_waha.delivered_texts()) >= CHATS * TURNS, timeout=120)
    time.sleep(2 * float(HOST_ENV["LEASE_SECONDS"]))  # a second copy would show up by now
    texts: dict[str, list[str]] = collections.defaultdict(list)
    for sent in fake_waha.delivered_texts():
        texts[sent["chatId"]].append(sent["text"])
    wrong = {chat: texts[chat] for chat in chats()
             if texts[chat] != [f"Echo: {body_of(chat, turn)}" for turn in range(TURNS)]}
    assert not wrong, f"{len(wrong)} chats got a wrong sequence, e.g. {next(iter(wrong.items()))}"
    assert len(fake_waha.delivered_texts()) == CHATS * TURNS


def settled_stats(host: GunicornServer) -> dict:
    """The host's /stats once nothing is in progress (the ignored counts arrive within about a second)."""
    deadline = time.monotonic() + 20
    while True:
        counts = stats(host)
        if counts["messages_in_progress"] == 0 or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def assert_hosts_agree(*hosts: GunicornServer) -> None:
    """/health and /stats say the same on every host: they read the one database."""
    shared = ("messages_received", "messages_processed", "messages_failed", "messages_skipped",
              "messages_in_progress", "messages_undelivered", "llm_cost_usd")
    for _ in range(50):  # each worker writes its tally of ignored requests about once a second
        documents = [settled_stats(host) for host in hosts]
        if all(d == documents[0] for d in documents):
            break
        time.sleep(0.2)
    first = documents[0]
    assert (first["messages_received"], first["messages_processed"], first["messages_in_progress"]) == (500, 500, 0)
    for document in documents[1:]:
        assert {k: document[k] for k in shared} == {k: first[k] for k in shared}
    health = [httpx.get(host.url + "/health", timeout=5) for host in hosts]
    assert [h.status_code for h in health] == [200] * len(hosts)
    # What each check says; its `since` is when this host saw it so (the store check is each host's own).
    verdicts = [{name: (c["status"], c["reason"]) for name, c in h.json()["checks"].items()} for h in health]
    assert all(v == verdicts[0] for v in verdicts), verdicts
    assert {h.json()["status"] for h in health} == {"healthy"}


# --- the tests ---------------------------------------------------------------------------------------

def test_kill_9_of_one_host_mid_burst_and_the_survivor_answers_everything_once(
        two_hosts, fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    doomed, survivor = two_hosts()
    fake_llm.latency_s = 0.05  # replies overlap, so the doomed host dies with some in progress
    seen_at_kill: list[int] = []
    held_at_kill: list[str] = []

    def kill_host() -> None:
        # Killed while it holds replies in progress (seen in the database), so the survivor must take them over.
        # The LLM is slowed first: at 50 ms a host finished every reply it held between the look and the kill.
        fake_llm.latency_s = 2.0
        time.sleep(0.2)  # the replies begun before, at 50 ms, are over
        deadline = time.monotonic() + 10
        while not (held := live_leases_of(doomed)) and time.monotonic() < deadline:
            time.sleep(0.01)
        held_at_kill.extend(held)
        seen_at_kill.append(len(fake_waha.delivered_texts()))
        os.killpg(doomed.process.pid, signal.SIGKILL)  # master and workers at once, like a power cut
        doomed.process.wait()
        fake_llm.latency_s = 0.05

    try:
        killer = when_delivered(fake_waha, 150, kill_host)
        Sender((doomed, survivor)).send_all(chats())
        killer.join(timeout=60)
        assert_every_message_answered_once_in_order(fake_waha)
    finally:
        fake_llm.latency_s = 0.0
    assert seen_at_kill and seen_at_kill[0] < CHATS * TURNS  # it really died mid-burst
    assert doomed.process.poll() is not None
    assert held_at_kill, "the doomed host held no reply in progress when it was killed"
    assert "decision=working attempt=2" in survivor.log_text()  # it took over leases of the dead host
    assert_hosts_agree(survivor)


def test_postgresql_restarted_mid_burst_costs_503s_then_everything_is_answered_once(
        two_hosts, database_server: PostgresServer, fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    host_a, host_b = two_hosts()
    fake_llm.latency_s = 0.05

    def restart_database() -> None:
        database_server.pause()
        time.sleep(3)
        database_server.resume()

    sender = Sender((host_a, host_b), seed=7)
    try:
        restarter = when_delivered(fake_waha, 150, restart_database)
        sender.send_all(chats())
        restarter.join(timeout=60)
        assert_every_message_answered_once_in_order(fake_waha)
    finally:
        fake_llm.latency_s = 0.0
    assert sender.statuses[503] > 0, sender.statuses  # the outage was seen, and WAHA was told to redeliver
    assert_hosts_agree(host_a, host_b)


def live_leases_of(host: GunicornServer) -> list[str]:
    """Keys of the messages whose lease, still running, is held by one of `host`'s workers (from the database)."""
    import psycopg

    with psycopg.connect(host.env["STATE_DB"], connect_timeout=5) as connection:
        rows = connection.execute(
            "SELECT key, lease_owner FROM inbox WHERE status IN ('processing', 'sending')"
            " AND lease_owner IS NOT NULL AND lease_expires_at > %s", (time.time(),)).fetchall()
    workers = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == host.process.pid:
            workers.add(int(pid))
    return [key for key, owner in rows if int(owner.split(":")[1]) in workers]  # owner: node:pid:random


def test_a_host_restarted_while_the_other_is_busy_steals_no_lease(
        two_hosts, fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    # Leases long enough that none runs out on a busy machine: any second LLM call would be a stolen lease.
    # LLM timeouts above the slow answers below, so a slow answer is not retried either.
    busy, restarted = two_hosts(LEASE_SECONDS="20", LLM_TIMEOUT_SECONDS="30", LLM_DEADLINE_SECONDS="60")
    fake_llm.latency_s = 0.3  # the busy host always has replies in progress
    held_at_start: list[list[str]] = []
    restart_errors: list[str] = []

    def restart_host() -> None:
        try:
            # Slower answers while it stops, so the busy host cannot finish the whole burst meanwhile (the
            # wait below needs replies of its in progress).
            fake_llm.latency_s = 2.0
            stopped = restarted.stop()
            assert stopped == 0, f"graceful stop ended with {stopped}"  # its replies finish or are handed back
            fake_llm.latency_s = 0.3
            # Only the busy host calls the LLM now: its next answers take longer than the restart, so its
            # leases are live and its replies in progress while the restarted host recovers at start.
            fake_llm.add_fault("/chat/completions", delay_s=8, times=40)
            wait_for(lambda: len(live_leases_of(busy)) >= 3, timeout=30)
            held_at_start.append(live_leases_of(busy))
            restarted.start()
        except Exception as exc:  # a failure here must fail the test with its reason, not vanish with the thread
            restart_errors.append(repr(exc))
            if restarted.process is None or restarted.process.poll() is not None:
                restarted.start()  # so the burst can end
        finally:
            fake_llm.latency_s = 0.3
            fake_llm.clear_faults()

    try:
        restarter = when_delivered(fake_waha, 150, restart_host)
        Sender((busy, restarted), seed=3).send_all(chats())
        restarter.join(timeout=90)
        assert_every_message_answered_once_in_order(fake_waha)
    finally:
        fake_llm.latency_s = 0.0
        fake_llm.clear_faults()
    assert not restart_errors, restart_errors
    assert held_at_start and held_at_start[0], "the busy host held no live lease when the other host started"
    recovered = [line for line in (restarted.log_text() + restarted.tail(400)).splitlines() if "recovering" in line]
    assert not recovered, recovered  # nothing of the busy host's was taken at the restarted host's start
    asked = collections.Counter(body["messages"][-1]["content"] for body in fake_llm.completions())
    twice = {text: n for text, n in asked.items() if n > 1}
    assert not twice, f"{len(twice)} messages got a second LLM call, e.g. {next(iter(twice.items()))}"
    assert sum(asked.values()) == CHATS * TURNS
    assert_hosts_agree(busy, restarted)


# --- from one host on SQLite to PostgreSQL -------------------------------------------------------------

def migrate_command(server: GunicornServer, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "whatsapp_webhook_server.py", "--migrate-to-postgres", url],
                          cwd=REPO, env=server.env, capture_output=True, text=True, timeout=120)


def test_a_state_file_with_messages_in_flight_moves_to_postgresql_and_each_is_answered_once(
        start_server, database_server: PostgresServer, fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    # LEASE_SECONDS=600: were the old server's leases carried over, nothing would be answered for ten minutes.
    old = start_server(**{**HOST_ENV, "LEASE_SECONDS": "600", "WEBHOOK_SYNC_WAIT_SECONDS": "0.5",
                          "LLM_TIMEOUT_SECONDS": "120", "LLM_DEADLINE_SECONDS": "300"})
    first = wp.text_message("NOWEB", sender=wp.CUSTOMER_PN, body="Bom dia", timestamp=int(time.time()) - 60)
    deliver(old, first)
    wait_for(lambda: fake_waha.delivered_texts(), timeout=10)  # answered: history to carry over
    fake_llm.add_fault("/chat/completions", delay_s=60, times=0)  # the LLM is stuck: replies stay in flight
    in_flight = [wp.text_message("NOWEB", sender=chat, body=f"{chat[:13]} em andamento")
                 for chat in (wp.CUSTOMER_PN, wp.OTHER_PN, "5511955554444@c.us")]
    for envelope in in_flight:
        assert deliver(old, envelope).status_code == 202
        old.pid_working_on(envelope["id"])
    queued = wp.text_message("NOWEB", sender=wp.OTHER_PN, body="e mais uma")  # waits behind its chat's reply
    assert deliver(old, queued).status_code == 202
    url = database_server.create_database("migrated")
    refused = migrate_command(old, url)
    assert refused.returncode == 2 and "stop the server before migrating" in refused.stderr, refused.stderr
    os.killpg(old.process.pid, signal.SIGKILL)  # the server is stopped the hard way: its leases stay in the file
    old.process.wait()
    fake_llm.clear_faults()
    fake_llm.reset()
    moved = migrate_command(old, url)
    assert moved.returncode == 0, moved.stderr
    assert "4 unfinished messages" in moved.stdout and "next: set STATE_DB=" in moved.stdout
    assert not os.path.exists(old.state_db) and os.path.exists(old.state_db + ".migrated-to-postgresql")

    new = start_server(**{**HOST_ENV, "LEASE_SECONDS": "600", "STATE_DB": url})
    wait_for(lambda: len(fake_waha.delivered_texts()) >= 5, timeout=30)
    time.sleep(2)
    texts = collections.defaultdict(list)
    for sent in fake_waha.delivered_texts():
        texts[sent["chatId"]].append(sent["text"])
    assert texts == {wp.CUSTOMER_PN: ["Echo: Bom dia", f"Echo: {wp.CUSTOMER_PN[:13]} em andamento"],
                     wp.OTHER_PN: [f"Echo: {wp.OTHER_PN[:13]} em andamento", "Echo: e mais uma"],
                     "5511955554444@c.us": ["Echo: 5511955554444 em andamento"]}
    asked = [body["messages"] for body in fake_llm.completions()]
    assert len(asked) == 4  # one LLM call for each message in flight, none for the one answered before
    with_history = next(m for m in asked if m[-1]["content"] == f"{wp.CUSTOMER_PN[:13]} em andamento")
    assert [turn["content"] for turn in with_history[1:-1]] == ["Bom dia", "Echo: Bom dia"]  # history moved too
    counts = settled_stats(new)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_in_progress"]) == (5, 5, 0)
    assert deliver(new, first).json()["reason"] == "duplicate"  # WAHA's late copy of a migrated message


# --- the conversation rules and fencing, across hosts ----------------------------------------------------

def test_bursts_memory_and_handoff_are_shared_by_both_hosts(two_hosts, fake_waha: FakeWaha,
                                                            fake_llm: FakeOpenRouter) -> None:
    host_a, host_b = two_hosts(DEBOUNCE_SECONDS="2", WEBHOOK_SYNC_WAIT_SECONDS="10")
    chat, base = "5521922220001@c.us", int(time.time())
    burst = ["oi", "tudo bem?", "quero saber o preço do plano anual"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = []
        for n, (text, host) in enumerate(zip(burst, (host_a, host_b, host_a), strict=True)):
            futures.append(pool.submit(deliver, host, wp.text_message("NOWEB", sender=chat, body=text,
                                                                      timestamp=base + n)))
            time.sleep(0.5)
        answers = [f.result().json() for f in futures]
    assert sorted(a["result"]["status"] for a in answers) == ["merged", "merged", "success"]
    assert [t["text"] for t in fake_waha.delivered_texts()] == ["Echo: " + "\n".join(burst)]
    # Our own reply, echoed back to the other host, is known as ours there too.
    echo_back = wp.own_app_message_any("NOWEB", chat=chat, body="Echo: " + "\n".join(burst))
    assert deliver(host_b, echo_back).json()["detail"] == "the bot's own reply"
    # A person answers from the phone; WAHA tells host B; host A must stay silent.
    assert "bot paused" in deliver(host_b, wp.own_app_message_any("NOWEB", chat=chat, body="Oi, sou a Ana")).json()[
        "detail"]
    assert deliver(host_a, wp.text_message("NOWEB", sender=chat, body="Obrigado Ana")).json()["result"][
        "status"] == "skipped"
    assert stats(host_a)["chats_paused"] == stats(host_b)["chats_paused"] == {"handoff": 1}
    assert "resumed" in deliver(host_a, wp.own_app_message_any("NOWEB", chat=chat, body="/bot on")).json()["detail"]
    assert deliver(host_b, wp.text_message("NOWEB", sender=chat, body="e o boleto?")).json()["result"][
        "status"] == "success"
    prompt = [m["content"] for m in fake_llm.completions()[-1]["messages"][1:]]
    assert prompt == ["\n".join(burst), "Echo: " + "\n".join(burst), "e o boleto?"]  # host A's turn, on host B
    assert len(fake_llm.completions()) == 2


def test_a_host_frozen_past_its_lease_cannot_send_a_reply_the_other_host_took_over(
        two_hosts, fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    frozen, other = two_hosts(LEASE_SECONDS="2", LLM_TIMEOUT_SECONDS="30", LLM_DEADLINE_SECONDS="60")
    envelope = wp.text_message("NOWEB", body="Vocês abrem sábado?")
    fake_llm.add_fault("/chat/completions", delay_s=4)  # the first attempt is still thinking when its host freezes
    assert deliver(frozen, envelope).status_code == 202
    frozen.pid_working_on(envelope["id"])
    os.killpg(frozen.process.pid, signal.SIGSTOP)  # a VM paused, a long GC, a partition: alive but silent
    try:
        wait_for(lambda: fake_waha.delivered_texts(), timeout=20)  # the other host took the lease over
    finally:
        os.killpg(frozen.process.pid, signal.SIGCONT)
    wait_for(lambda: "lease lost" in frozen.log_text(), timeout=20)  # its LLM answer arrived: too late to send
    time.sleep(1)
    assert [t["text"] for t in fake_waha.delivered_texts()] == ["Echo: Vocês abrem sábado?"]
    assert len(fake_llm.completions()) == 2
    assert "decision=working attempt=2" in other.log_text()
    counts = stats(frozen)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_in_progress"]) == (1, 1, 0)
