"""The PostgreSQL store's own behaviour: many workers at once, fork safety, migrations raced by several
servers, options passed through the URL, and a database that goes away and comes back.
What every backend must do is in test_store_contract.py (which runs on PostgreSQL too)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from fakes import waha_payloads as wp
from fakes.postgres_server import PostgresServer
from tests import postgres
from tests.conftest import post_event
from whatsapp_webhook import EXTENSION_KEY
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.policy import send_verdict
from whatsapp_webhook.settings import Settings, SettingsError
from whatsapp_webhook.store_api import (
    AdmissionRequest,
    ChatLimits,
    Outcome,
    SendVerdict,
    StoreUnavailable,
    Verdict,
)
from whatsapp_webhook.store_schema import LLM_COST_COUNTER
from whatsapp_webhook.stores import open_store

psycopg = pytest.importorskip("psycopg")
from whatsapp_webhook.pg_schema import SCHEMA_VERSION
from whatsapp_webhook.pg_store import PostgresStore


@pytest.fixture
def url() -> str:
    return postgres.fresh_database()


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(url)
    store.initialize()
    yield store
    store.close()


def incoming(chat: str = wp.CUSTOMER_PN, *, ts: float = 100.0, body: str = "Oi", bare: str | None = None
             ) -> IncomingMessage:
    envelope = wp.text_message("WEBJS", sender=chat, body=body, message_id=bare)
    envelope["payload"]["timestamp"] = ts
    message = classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)
    assert isinstance(message, IncomingMessage)
    return message


def test_open_store_picks_the_backend_from_state_db(url: str, tmp_path) -> None:
    base = Settings(openrouter_api_key="k", waha_api_key="w")
    pg = open_store(Settings(**{**base.__dict__, "state_db": url, "state_db_pool_size": 3,
                                "state_db_timeout_seconds": 2.5}))
    assert isinstance(pg, PostgresStore) and (pg.pool_size, pg.timeout, pg.pooled) == (3, 2.5, True)
    assert open_store(Settings(**{**base.__dict__, "state_db": url}), one_off=True).pooled is False
    sqlite = open_store(Settings(**{**base.__dict__, "state_db": str(tmp_path / "s.db")}))
    assert type(sqlite).__name__ == "StateStore"


def test_a_batch_of_deliveries_is_recorded_in_the_order_it_came_each_key_once(store) -> None:
    """What the deliveries recorded together in one statement get: per-chat order follows the batch (two
    messages of one chat in the same second; the rows go in in key order, so the later one's key is smaller
    here), a key twice in it is new once, a voice note gets its download."""
    first, second = incoming(body="oi", bare="3EB0Z1"), incoming(body="preço?", bare="3EB0A2")
    voice = wp.media_message("WEBJS", kind="audio", sender="5511977776666@c.us", message_id="3EB0B1")
    voice_note = classify_event(parse_event(wp.dumps(voice)), reply_in_groups=True)
    assert isinstance(voice_note, IncomingMessage)
    assert store._record_new([first, second, voice_note, second]) == [True, True, True, False]
    assert store.snapshot().counters["messages_received"] == 3
    assert store.media_job(voice_note.dedupe_key) is not None and store.media_job(first.dedupe_key) is None
    assert not store.accept(first).stored  # already recorded: a duplicate now
    lead = store.claim_due("w1", limit=5, lease_seconds=30)
    assert [c.message.dedupe_key for c in lead if c.message.chat_key == first.chat_key] == [first.dedupe_key]
    store.finish(first.dedupe_key, "w1", outcome=Outcome.SUCCESS, sent_message_id=None)
    (after,) = [c for c in store.claim_due("w1", limit=5, lease_seconds=30) if c.message.chat_key == first.chat_key]
    assert after.message.dedupe_key == second.dedupe_key


def test_a_delivery_the_database_cannot_take_fails_alone_not_with_its_batch(store) -> None:
    """Recorded together, deliveries fail together only for an outage: one the database refuses for what it
    holds is tried alone, and the others are recorded."""
    good, other = incoming(body="oi", bare="3EB0C1"), incoming(chat="5511944443333@c.us", body="olá", bare="3EB0C2")
    broken = replace(incoming(chat="5511955554444@c.us", bare="3EB0C3"), text="meio \ud83d emoji")  # lone surrogate
    results = store._record_new([good, broken, other])
    assert results[0] is True and results[2] is True and isinstance(results[1], Exception)
    assert store.entry(good.dedupe_key) is not None and store.entry(other.dedupe_key) is not None
    assert store.entry(broken.dedupe_key) is None and store.snapshot().counters["messages_received"] == 2


def failed_with(sqlstate: str | None, kind: type[BaseException] | None = None) -> StoreUnavailable:
    import psycopg

    cause = (kind or psycopg.errors.lookup(sqlstate))("the server said no")  # type: ignore[arg-type]
    try:
        raise StoreUnavailable(f"state store error: {cause}") from cause
    except StoreUnavailable as exc:
        return exc


def test_an_outage_is_told_from_a_value_the_database_refuses() -> None:
    """Recorded together, deliveries fail together only for an outage (pg_base.database_trouble)."""
    import psycopg
    import psycopg_pool

    from whatsapp_webhook.pg_base import database_trouble

    for sqlstate in ("08006", "40P01", "40001", "53100", "57014", "57P01", "25006", "55P03"):
        assert database_trouble(failed_with(sqlstate)), sqlstate
    assert database_trouble(failed_with(None, psycopg.OperationalError))  # no connection at all
    assert database_trouble(failed_with(None, psycopg_pool.PoolTimeout))
    for sqlstate in ("54000", "22021", "23505", "22P02"):  # index row too big, bad bytes, duplicate, bad input
        assert not database_trouble(failed_with(sqlstate)), sqlstate
    assert not database_trouble(ValueError("a bug")) and not database_trouble(StoreUnavailable("no cause"))


def test_once_the_database_fails_while_deliveries_are_tried_one_by_one_the_rest_are_not_tried(
    store, monkeypatch
) -> None:
    """A batch refused for one delivery's value is tried one delivery at a time; if the database then goes
    down, the deliveries left fail at once with it instead of each waiting out the timeout."""
    messages = [incoming(bare=f"3EB0E{n}", chat=f"55119333{n:05d}@c.us") for n in range(6)]
    tried: list[int] = []
    real = PostgresStore._insert_new

    def insert(self: PostgresStore, batch: list[IncomingMessage]) -> list[bool]:
        tried.append(len(batch))
        if len(batch) > 1:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        if batch[0] is messages[2]:
            raise failed_with("57P01")  # the server is shutting down
        return real(self, batch)

    monkeypatch.setattr(PostgresStore, "_insert_new", insert)
    results = store._record_new(messages)
    assert tried == [6, 1, 1, 1]  # the batch, then the first three alone
    assert results[:2] == [True, True]
    assert all(isinstance(result, StoreUnavailable) for result in results[2:])
    assert len({id(result) for result in results[2:]}) == 4  # each delivery its own exception
    from whatsapp_webhook.pg_base import database_trouble

    assert all(database_trouble(result) for result in results[2:])  # each keeps its cause: an outage, logged as one


def test_two_workers_recording_the_same_keys_in_opposite_orders_do_not_deadlock(url: str, store) -> None:
    """message and message.any of one WhatsApp message share a key and may reach two workers at once, in
    batches of different orders; the rows go in in key order, so one batch waits for the other, never both."""
    import psycopg

    from whatsapp_webhook.pg_schema import ACCEPT_SQL

    a, b, c, d = (incoming(bare=f"3EB0{x}") for x in ("AAAA", "BBBB", "CCCC", "DDDD"))

    def params(batch: list[IncomingMessage], shard: int) -> dict[str, Any]:
        return {"keys": [m.dedupe_key for m in batch], "chat_keys": [m.chat_key for m in batch],
                "sort_ts": [100.0] * len(batch), "messages": [m.to_json() for m in batch],
                "text_hashes": [None] * len(batch), "urls": [None] * len(batch), "mimetypes": [""] * len(batch),
                "now": 1000.0, "shard": shard}

    blocker_c, blocker_d = psycopg.connect(url), psycopg.connect(url)  # uncommitted inserts of c and d
    worker1, worker2 = psycopg.connect(url, autocommit=True), psycopg.connect(url, autocommit=True)
    errors: list[BaseException] = []

    def run(connection: Any, batch: list[IncomingMessage], shard: int) -> None:
        try:
            connection.execute(ACCEPT_SQL, params(batch, shard)).fetchall()
        except BaseException as exc:
            errors.append(exc)

    try:
        blocker_c.execute(ACCEPT_SQL, params([c], 1))
        blocker_d.execute(ACCEPT_SQL, params([d], 2))
        first = threading.Thread(target=run, args=(worker1, [a, c, b], 3))
        second = threading.Thread(target=run, args=(worker2, [b, d, a], 4))
        first.start()
        second.start()
        time.sleep(0.5)
        blocker_c.commit()  # in arrival order, worker 1 would now wait for b and worker 2 for a: a cycle
        time.sleep(0.3)
        blocker_d.commit()
        first.join(10)
        second.join(10)
        stuck = first.is_alive() or second.is_alive()
        if stuck:
            worker1.cancel()
            worker2.cancel()
        assert not stuck and errors == []
    finally:
        for connection in (blocker_c, blocker_d, worker1, worker2):
            connection.close()
    assert {store.entry(m.dedupe_key).status for m in (a, b, c, d)} == {"queued"}


# --- many workers at once ----------------------------------------------------------------------------

def test_workers_admitting_one_chat_at_the_same_moment_never_pass_the_limit_together(url: str, store) -> None:
    limits = ChatLimits(per_minute=5, per_day=100, loop_repeats=1000, loop_window=60, loop_pause=60)
    workers = [PostgresStore(url) for _ in range(4)]  # a pool each, like four gunicorn workers
    start = threading.Barrier(20)
    verdicts: list[Verdict] = []

    def admit(worker: PostgresStore, n: int) -> None:
        start.wait()
        verdicts.append(worker.admit("default:chat", texts=[f"m{n}"], limits=limits).verdict)

    threads = [threading.Thread(target=admit, args=(workers[n % 4], n)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.close()
    assert sorted(verdicts).count(Verdict.OK) == 5 and verdicts.count(Verdict.RATE_LIMITED) == 15


def _claim_and_finish_all(url: str, owner: str, results: Any) -> None:
    store = PostgresStore(url)
    events = []
    while True:
        batch = store.claim_due(owner, limit=8, lease_seconds=600)
        if not batch:
            break
        for claimed in batch:
            events.append((time.monotonic(), "claim", claimed.message.chat_key, claimed.message.dedupe_key))
            time.sleep(0.001)
            events.append((time.monotonic(), "finish", claimed.message.chat_key, claimed.message.dedupe_key))
            store.finish(claimed.message.dedupe_key, owner, outcome=Outcome.SUCCESS, sent_message_id=None)
    store.close()
    results.put(events)


def deadlocks(url: str) -> int:
    """How many deadlocks PostgreSQL has broken in this database (each one logged and one transaction undone)."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_stat_clear_snapshot()")
        row = c.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
        return int(row[0])


def test_forgetting_a_chat_while_a_claim_decides_its_admission_waits_instead_of_deadlocking(url: str, store) -> None:
    """--forget-chat locks the chat's state row, then its messages; a claim locks its messages, then (deciding
    the admission) the chat's state row. Forgetting waits for the claim instead of meeting it halfway."""
    chat = f"default:{wp.CUSTOMER_PN}"
    store.set_opted_out(chat, False)  # the chat has its state row, as any chat answered before
    store.accept(incoming(body="oi"))
    before = deadlocks(url)
    cli = PostgresStore(url)
    deciding, reports = threading.Event(), []

    def slow(claimed: Any) -> AdmissionRequest:
        deciding.set()
        time.sleep(0.5)  # the claim holds the message's row meanwhile; the forget starts now
        return AdmissionRequest(texts=claimed.texts, limits=ChatLimits(per_minute=5, per_day=100, loop_repeats=1000,
                                                                       loop_window=60, loop_pause=60))

    forgetting = threading.Thread(target=lambda: deciding.wait(10) and reports.append(cli.forget_chat(chat)))
    forgetting.start()
    try:
        claimed = store.claim_due("w1", limit=1, lease_seconds=30, admit=slow)
    finally:
        forgetting.join(30)
        cli.close()
        store.close()  # its backends end, and with them their statistics are written
    assert [c.admission.verdict for c in claimed] == [Verdict.OK] and reports[0].dropped_open == 1
    assert deadlocks(url) == before


def test_begin_send_gives_policys_verdict_in_every_case_and_a_plain_send_takes_one_statement(
    url: str, store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """begin_send's common case is one statement (BEGIN_SEND_FAST_SQL), which decides SEND in SQL; anything else
    goes to the locked transaction, where policy.send_verdict decides. Whatever the path, the verdict and the
    message's state must be policy's, in every combination of what the decision reads; the cost counts once."""
    store_transactions = [0]
    write = store._write

    def counted_write(work: Any) -> Any:
        store_transactions[0] += 1
        return write(work)

    monkeypatch.setattr(store, "_write", counted_write)
    cases = list(itertools.product(("processing", "sending", "queued"), ("w1", "w2"), (0, 1), (False, True),
                                   (False, True), (0, 2), (True, False)))
    for n, (status, owner, parts_sent, earlier, paused, sends, with_parts) in enumerate(cases):
        chat = f"55319{n:08d}@c.us"
        message = incoming(chat, ts=200, bare=f"3EB0C{n:08d}")
        store.accept(message)
        key = message.dedupe_key
        if earlier:  # an earlier message of the chat, still open: it arrived late
            store.accept(incoming(chat, ts=100, bare=f"3EB0E{n:08d}"))
        if paused:
            store.pause_chat(message.chat_key, until=time.time() + 3600, reason="human")
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("UPDATE inbox SET status = %s, lease_owner = %s, lease_expires_at = %s, parts_sent = %s,"
                      " sends = %s, attempts = 1 WHERE key = %s",
                      (status, None if status == "queued" else owner, time.time() + 30, parts_sent, sends, key))
        expected = send_verdict(holds_lease=status != "queued" and owner == "w1",
                                already_sending=status == "sending" or parts_sent > 0, earlier_open=earlier,
                                paused=paused, sends=sends, max_sends=2 if with_parts else None)
        transactions_before = store_transactions[0]
        verdict = store.begin_send(key, "w1", parts=["Olá!"] if with_parts else [], max_sends=2,
                                   reply=("Olá!", Outcome.SUCCESS), llm_cost_usd=0.000001)
        case = f"case {n}: {status=} {owner=} {parts_sent=} {earlier=} {paused=} {sends=} {with_parts=}"
        assert verdict is expected, case
        with psycopg.connect(url, autocommit=True) as c:
            after = c.execute("SELECT status, sends FROM inbox WHERE key = %s", (key,)).fetchone()
        if expected is SendVerdict.SEND:
            assert after == ("sending", sends + (1 if with_parts else 0)), case
            assert store_transactions[0] == transactions_before, case  # one statement, no transaction
        else:
            assert after[0] != "sending" or status == "sending", case
    assert store.begin_send("no-such-key", "w1", parts=["Olá!"], llm_cost_usd=0.000001) is SendVerdict.LOST
    # What writing each reply cost (1,000 billionths of a dollar) is counted once, whatever the verdict and path.
    assert store.read_counters([LLM_COST_COUNTER]) == {LLM_COST_COUNTER: 1000 * (len(cases) + 1)}


def test_four_processes_claim_every_message_once_and_one_chat_at_a_time_in_order(url: str, store) -> None:
    keys_by_chat: dict[str, list[str]] = {}
    for turn in range(5):
        for n in range(30):
            message = incoming(f"55219{n:08d}@c.us", ts=100 + turn, bare=f"3EB0{n:09X}{turn:09X}")
            store.accept(message)
            keys_by_chat.setdefault(message.chat_key, []).append(message.dedupe_key)
    store.snapshot()  # the parent used its pool: the children must open their own after the fork
    context = multiprocessing.get_context("fork")
    results: Any = context.Queue()
    processes = [context.Process(target=_claim_and_finish_all, args=(url, f"p{i}", results)) for i in range(4)]
    for process in processes:
        process.start()
    events = sorted(event for _ in processes for event in results.get(timeout=120))
    for process in processes:
        process.join(timeout=30)
    claims = [key for _, kind, _, key in events if kind == "claim"]
    assert len(claims) == 150 and len(set(claims)) == 150
    for chat, keys in keys_by_chat.items():
        assert [key for _, kind, c, key in events if kind == "claim" and c == chat] == keys  # in send order
        kinds = [kind for _, kind, c, _ in events if c == chat]
        assert kinds == ["claim", "finish"] * 5  # never a second message of a chat while one is unfinished
    assert store.snapshot().counters["messages_processed"] == 150


def test_a_pool_never_crosses_a_fork(url: str, store) -> None:
    def backend_and_its_process(c: Any) -> tuple[int, int]:
        name = c.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0]
        return c.info.backend_pid, int(name.rsplit(":", 1)[1])  # the pool names its connections by process

    parent_backend, opened_by = store._run(backend_and_its_process)
    assert opened_by == os.getpid()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            backend, opener = store._run(backend_and_its_process)
            os.write(writer, f"{backend} {opener}".encode())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    child_backend, child_opener = map(int, os.read(reader, 64).split())
    assert child_opener == child and child_backend != parent_backend  # the child dialled its own connection
    # The parent's pool still works, on connections the parent opened (it may hold more than one by now).
    assert store._run(backend_and_its_process)[1] == os.getpid()


# --- migrations ----------------------------------------------------------------------------------------

def _initialize(url: str, results: Any) -> None:
    try:
        PostgresStore(url).initialize()
        results.put("ok")
    except Exception as exc:  # reported to the parent
        results.put(repr(exc))


def test_several_servers_starting_at_once_migrate_once(url: str) -> None:
    context = multiprocessing.get_context("fork")
    results: Any = context.Queue()
    processes = [context.Process(target=_initialize, args=(url, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
    assert outcomes == ["ok"] * 4
    store = PostgresStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    assert store._run(lambda c: c.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]) == SCHEMA_VERSION
    store.close()


def test_a_database_of_a_newer_release_is_refused(url: str, store) -> None:
    store._write(lambda c: c.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (SCHEMA_VERSION + 1,)))
    with pytest.raises(SettingsError, match="written by a newer release"):
        PostgresStore(url).initialize()


def test_options_in_the_url_reach_the_server(url: str) -> None:
    store = PostgresStore(url + "?application_name=bot-on-host-a&options=-c%20statement_timeout%3D1234")
    store.initialize()
    name, timeout = store._run(
        lambda c: c.execute("SELECT current_setting('application_name'), current_setting('statement_timeout')"
                            ).fetchone())
    store.close()
    assert (name, timeout) == ("bot-on-host-a", "1234ms")  # the URL's options win over the store's own
    with pytest.raises(SettingsError, match="SSL") as error:  # TLS required, and the test server has none
        PostgresStore(url.replace("postgres@", "postgres:hunter2@") + "?sslmode=require").initialize()
    assert "hunter2" not in str(error.value)


def test_a_bad_password_or_database_is_a_settings_error_not_an_outage(url: str) -> None:
    with pytest.raises(SettingsError, match="cannot be used .*does not exist"):
        PostgresStore(url + "_missing").initialize()


# --- the database goes away and comes back -------------------------------------------------------------

@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, so stopping it does not disturb the others."""
    yield from postgres.private_server()


def test_an_outage_costs_503s_loses_nothing_and_heals_by_itself(own_server: PostgresServer, make_app,
                                                                 upstreams) -> None:
    url = own_server.create_database("bot")
    app = make_app(state_db=url, state_db_timeout_seconds=1.0)
    client = app.test_client()
    before = wp.text_message("WEBJS", body="antes da queda")
    assert post_event(client, before).get_json()["status"] == "processed"
    own_server.pause()
    during = wp.text_message("WEBJS", body="durante a queda")
    started = time.monotonic()
    response = post_event(client, during)
    assert response.status_code == 503 and "redeliver" in response.get_json()["error"]
    assert time.monotonic() - started < 10  # STATE_DB_TIMEOUT_SECONDS bounds each wait, not an OS timeout
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["checks"]["store"]["status"] == "failing"
    own_server.resume()
    for _ in range(50):  # WAHA redelivers until a 2xx
        response = post_event(client, during)
        if response.status_code != 503:
            break
        time.sleep(0.2)
    assert response.get_json()["status"] == "processed"
    assert client.get("/health").status_code == 200
    assert post_event(client, before).get_json()["reason"] == "duplicate"  # answered before the outage: kept
    assert [t["text"] for t in upstreams.sent_texts()] == ["Echo: antes da queda", "Echo: durante a queda"]
    store = app.extensions[EXTENSION_KEY].store
    assert store.snapshot().counters["messages_processed"] == 2


def test_a_worker_that_starts_while_the_database_is_down_waits_for_it(own_server: PostgresServer,
                                                                        make_app) -> None:
    url = own_server.create_database("bot")
    PostgresStore(url).initialize()  # the master migrated at start
    own_server.pause()
    app = make_app(state_db=url, state_db_timeout_seconds=0.5)  # must not raise: gunicorn would stop the server
    assert app.test_client().get("/health").status_code == 503
    own_server.resume()
    deadline = time.monotonic() + 15
    while app.test_client().get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the store did not come back"
        time.sleep(0.2)


def test_a_dead_connection_in_the_pool_is_replaced_without_an_error(url: str, store) -> None:
    message = incoming()
    store.accept(message)
    pid = store._run(lambda c: c.info.backend_pid)  # the pool's one idle connection
    admin = psycopg.connect(url, autocommit=True)
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        time.sleep(0.01)
    admin.close()
    assert store.entry(message.dedupe_key).status == "queued"  # a fresh connection, no StoreUnavailable
    assert store._run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0]) != pid
    with pytest.raises(StoreUnavailable):
        PostgresStore(url.replace("/" + url.rsplit("/", 1)[1], "/gone"), timeout=0.5).accept(incoming())


def test_a_server_starting_on_a_shared_database_leaves_a_live_hosts_leases_alone(url: str, store) -> None:
    # Two hosts, one database: host B's start-up recovery must not hand host A's reply in progress to anyone.
    from whatsapp_webhook.app import recover_after_restart

    in_progress, abandoned = incoming(body="host A is answering"), incoming(wp.OTHER_PN, ts=50.0, body="host C died")
    store.accept(in_progress)
    store.accept(abandoned)
    assert [c.message for c in store.claim_due("host-c:1:dead", limit=1, lease_seconds=0.01)] == [abandoned]
    assert [c.message for c in store.claim_due("host-a:1:live", limit=1, lease_seconds=60)] == [in_progress]
    time.sleep(0.05)
    assert recover_after_restart(Settings(openrouter_api_key="k", waha_api_key="w", state_db=url)) == 1
    assert store.claim_due("host-b:1:new", limit=10, lease_seconds=60)[0].message == abandoned
    assert store.renew_leases([in_progress.dedupe_key], "host-a:1:live", lease_seconds=60) == 1
    assert store.begin_send(in_progress.dedupe_key, "host-a:1:live", parts=["oi"], reply=("oi", Outcome.SUCCESS)) == "send"
