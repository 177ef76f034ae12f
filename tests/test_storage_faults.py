"""Storage faults an unlucky operator meets: a full disk (SQLITE_FULL, forced with PRAGMA max_page_count) and a
state file deleted or replaced while the server runs. What WAHA, the customer and /health see; the gunicorn
versions of these (a real small tmpfs, a real rm) are in tests/e2e/test_storage_faults.py."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from typing import Any

import httpx
import pytest

from fakes import waha_payloads as wp
from tests.conftest import completion, make_settings, no_sleep, post_event
from tests.test_store_contract import incoming
from whatsapp_webhook import sqlite_base
from whatsapp_webhook.app import create_app, shutdown
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import StateFileLost, StoreFull


class CappedStore(StateStore):
    """The real SQLite store on a file that may not grow past `max_pages` pages: SQLite answers SQLITE_FULL
    ("database or disk is full") exactly where a full disk would stop it. max_page_count is a setting of each
    connection, so every connection gets the current cap before each use."""

    max_pages: int | None = None

    def _connection(self) -> sqlite3.Connection:
        connection = super()._connection()
        connection.execute(f"PRAGMA max_page_count = {self.max_pages or 1_073_741_823}")
        return connection

    def fill_up(self) -> None:
        """No more pages than the file has now, and none of them free: the next insert of any size fails."""
        with sqlite3.connect(self.path) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages, free = c.execute("PRAGMA page_count").fetchone()[0], c.execute("PRAGMA freelist_count").fetchone()[0]
        self.max_pages = pages
        if free:  # use up the free pages, so the cap really is full
            with sqlite3.connect(self.path) as c:
                c.execute("CREATE TABLE IF NOT EXISTS ballast (b BLOB)")
                c.execute(f"PRAGMA max_page_count = {pages}")
                try:
                    while True:
                        c.execute("INSERT INTO ballast VALUES (zeroblob(1024))")
                except sqlite3.OperationalError:
                    pass

    def make_room(self) -> None:
        self.max_pages = None


@pytest.fixture
def short_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """/health remembers a refused write for 10 s; the tests do not wait that long."""
    monkeypatch.setattr(sqlite_base, "FULL_DISK_MEMORY_SECONDS", 0.3)


@pytest.fixture
def capped_app(tmp_path: Any, upstreams: Any) -> Any:
    apps = []

    def build(**overrides: Any) -> tuple[Any, CappedStore]:
        settings = make_settings(tmp_path, **overrides)
        store = CappedStore(settings.state_db)
        app = create_app(settings, store=store, sleep=no_sleep)
        apps.append(app)
        return app, store

    yield build
    for app in apps:
        shutdown(app)


class ServerLog:
    """What the server logged during the test (its handler writes to the stdout pytest captures)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys, self.seen = capsys, ""

    def lines(self) -> list[str]:
        captured = self.capsys.readouterr()
        self.seen += captured.out + captured.err
        return self.seen.splitlines()


def key_of(envelope: dict[str, Any]) -> str:
    """The inbox key of a message: its session and its bare WhatsApp id (the last part of a serialized id)."""
    return f"{envelope['session']}:{envelope['payload']['id'].split('_')[-1]}"


def wait_until(condition: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_the_store_names_a_full_disk_and_its_probe_write_fails_while_small_writes_still_pass(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(sqlite_base, "PROBE_REUSE_SECONDS", 0.0)
    store = CappedStore(str(tmp_path / "state.db"))
    store.initialize()
    store.ping()
    store.fill_up()
    store.count("anything")  # a counter update rewrites a page the file has: a full disk lets it through
    with pytest.raises(StoreFull):
        store.ping()  # a message-sized write needs new pages: refused, as the next customer message would be
    with pytest.raises(StoreFull) as refused:
        store.accept(incoming(body="x" * 20_000))
    assert "full" in str(refused.value)


def test_health_probes_on_a_full_disk_never_fail_the_small_writes_of_other_threads(tmp_path, monkeypatch) -> None:
    """On SQLITE_FULL SQLite ends the whole transaction: a probe in a group commit would fail every write
    committed with it (a counter, a lease renewal) although those fit."""
    monkeypatch.setattr(sqlite_base, "PROBE_REUSE_SECONDS", 0.0)
    monkeypatch.setattr(sqlite_base, "FULL_DISK_MEMORY_SECONDS", 0.0)  # every ping really writes
    store = CappedStore(str(tmp_path / "state.db"))
    store.initialize()
    store.count("messages_received")
    store.fill_up()
    failed: list[Exception] = []

    def small_writes() -> None:
        for _ in range(20):
            try:
                store.count("messages_received")
            except StoreFull as exc:
                failed.append(exc)

    def probes() -> None:
        for _ in range(20):
            with pytest.raises(StoreFull):
                store.ping()

    threads = [threading.Thread(target=small_writes) for _ in range(4)] + [
        threading.Thread(target=probes) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == [] and store.snapshot().counters["messages_received"] == 81


def test_a_full_disk_makes_health_unhealthy_and_new_messages_503_until_space_returns(
    capped_app, upstreams, short_memory, capsys
) -> None:
    server_log = ServerLog(capsys)
    app, store = capped_app(max_message_chars=20_000)
    client = app.test_client()
    assert post_event(client, wp.text_message("WEBJS", body="oi")).status_code == 200
    store.fill_up()

    envelope = wp.text_message("WEBJS", body="Quero saber o preço " * 500)
    refused = post_event(client, envelope)
    assert refused.status_code == 503 and "not recorded" in refused.get_json()["error"]
    key = key_of(envelope)
    assert any(f"key={key}" in line and "full" in line for line in server_log.lines())
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "unhealthy"
    assert "disk is full" in health.get_json()["checks"]["store"]["reason"]

    store.make_room()
    time.sleep(0.4)  # the refused write is older than FULL_DISK_MEMORY_SECONDS now
    assert client.get("/health").get_json()["status"] == "healthy"
    redelivered = post_event(client, envelope)  # WAHA redelivers what got a 5xx
    assert redelivered.status_code == 200 and redelivered.get_json()["status"] == "processed"
    assert [t["text"][:17] for t in upstreams.sent_texts()] == ["Echo: oi", "Echo: Quero saber"]


def test_a_reply_cut_short_by_a_full_disk_is_sent_exactly_once_when_space_returns(
    capped_app, upstreams, short_memory, capsys
) -> None:
    """The disk fills while the LLM writes the reply: storing it fails, the message keeps its lease (no
    loop of LLM calls on a store that refuses writes) and is answered once after space returns. (After
    sendText the last write, finish, frees as much as it takes: the stored reply and message give way to
    the history, so a full disk does not stop it; a worker dying there is test_faults' kill -9 mid-send.)"""
    server_log = ServerLog(capsys)
    app, store = capped_app(lease_seconds=3.0, webhook_sync_wait_seconds=0.5, max_message_chars=20_000)
    client = app.test_client()
    reply = "Entregamos, sim! " + "Segue a tabela de bairros e horários. " * 150  # needs new pages to be stored
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion(reply))
    route = upstreams.llm
    answer = route.side_effect

    def fill_then_answer(request: Any) -> Any:
        if store.max_pages is None and not getattr(fill_then_answer, "done", False):
            fill_then_answer.done = True  # type: ignore[attr-defined]
            store.fill_up()  # the disk fills while the reply is being written
        return answer(request)

    route.side_effect = fill_then_answer
    envelope = wp.text_message("NOWEB", body="Vocês entregam hoje?")
    key = key_of(envelope)
    assert post_event(client, envelope).status_code == 202  # recorded before the disk filled
    wait_until(lambda: any(f"failed mid-reply key={key}" in line for line in server_log.lines()))
    assert client.get("/health").status_code == 503
    store.make_room()
    wait_until(lambda: (store.entry(key) or None) and store.entry(key).status == "done")  # type: ignore[union-attr]
    assert [t["text"] for t in upstreams.sent_texts()] == [reply.strip()]
    assert upstreams.llm.call_count == 2  # the attempt the disk cut short, and the one after: no loop


def test_a_disk_that_stays_full_costs_at_most_reply_max_attempts_llm_calls(capped_app, upstreams, capsys) -> None:
    server_log = ServerLog(capsys)
    app, store = capped_app(lease_seconds=1.0, reply_max_attempts=2, webhook_sync_wait_seconds=0.5,
                            max_message_chars=20_000)
    reply = "Temos sim! " + "Veja a lista completa de sabores e preços. " * 150  # needs new pages to be stored

    def fill_then_answer(request: Any) -> Any:
        if store.max_pages is None:
            store.fill_up()  # and nobody frees space
        return httpx.Response(200, json=completion(reply))

    upstreams.llm.side_effect = fill_then_answer
    envelope = wp.text_message("WEBJS", body="Tem pizza de calabresa?")
    post_event(app.test_client(), envelope)
    key = key_of(envelope)
    wait_until(lambda: (store.entry(key) or None) and store.entry(key).status == "failed")  # type: ignore[union-attr]
    assert upstreams.llm.call_count == 2 and upstreams.sent_texts() == []
    assert any("no attempt ended" in line and f"key={key}" in line for line in server_log.lines())


def test_a_deleted_state_file_is_never_recreated_and_every_call_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_base, "IDENTITY_CHECK_SECONDS", 0.0)
    path = tmp_path / "state.db"
    store = StateStore(str(path))
    store.initialize()
    store.accept(incoming(body="antes"))
    os.remove(path)
    for call in (lambda: store.accept(incoming(body="depois")), store.ping, store.snapshot):
        with pytest.raises(StateFileLost):
            call()
    assert not path.exists()  # no fresh empty file for some threads while others write to the deleted one


def test_a_state_file_moved_away_and_back_is_taken_up_again_with_its_messages(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_base, "IDENTITY_CHECK_SECONDS", 0.0)
    path = tmp_path / "state.db"
    store = StateStore(str(path))
    store.initialize()
    assert store.accept(incoming(body="antes", bare="A1")).stored
    os.rename(path, tmp_path / "moved.db")
    with pytest.raises(StateFileLost):
        store.ping()
    os.rename(tmp_path / "moved.db", path)
    store.ping()
    assert store.entry(incoming(body="antes", bare="A1").dedupe_key) is not None


def test_a_replaced_state_file_is_refused_by_running_and_by_later_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_base, "IDENTITY_CHECK_SECONDS", 0.0)
    monkeypatch.setenv(sqlite_base.STATE_FILE_ID_ENV, "")  # so pin_state_file's value is undone after the test
    path = tmp_path / "state.db"
    store = StateStore(str(path))
    store.initialize()
    sqlite_base.pin_state_file(str(path))  # what the gunicorn master does before it forks workers
    store.close()
    shutil.copy(path, tmp_path / "backup.db")
    os.replace(tmp_path / "backup.db", path)  # a restore from backup while the server runs: another inode
    with pytest.raises(StateFileLost):
        store.ping()
    late_worker = StateStore(str(path))
    with pytest.raises(StateFileLost):
        late_worker.initialize()  # a worker gunicorn starts now must not adopt the other file either


def test_a_health_check_on_a_replaced_file_is_unhealthy_with_what_to_do(
    make_app, upstreams, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(sqlite_base, "IDENTITY_CHECK_SECONDS", 0.0)
    client = make_app().test_client()
    assert post_event(client, wp.text_message("GOWS", body="oi")).status_code == 200
    os.remove(tmp_path / "state.db")
    response = post_event(client, wp.text_message("GOWS", body="ainda aí?"))
    assert response.status_code == 503
    health = client.get("/health")
    assert health.status_code == 503
    assert "deleted or replaced" in health.get_json()["checks"]["store"]["reason"]
