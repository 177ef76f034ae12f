"""--migrate-to-postgres (whatsapp_webhook/state_migration.py): an SQLite state file with messages in flight,
history, chat state, media bytes and counters moves into a real PostgreSQL database, once, and the command
refuses while a server uses the file or when the database already holds messages."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fakes import waha_payloads as wp
from tests import postgres
from tests.test_store_contract import incoming
from whatsapp_webhook.ownership import StateFileOwner
from whatsapp_webhook.state_migration import MIGRATED_SUFFIX, MigrationRefused, migrate_to_postgres
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import ChatLimits, Outcome, Turn, Verdict

pytest.importorskip("psycopg")
from whatsapp_webhook.pg_store import PostgresStore  # after the skip: needs psycopg

LIMITS = ChatLimits(per_minute=100, per_day=1000, loop_repeats=100, loop_window=120, loop_pause=3600)
ANSWERED_ID = "3EB0C0FFEE0000000000AB"
CUSTOMER, OTHER, PAUSED, QUIET = wp.CUSTOMER_PN, wp.OTHER_PN, "5511955554444@c.us", "5511944443333@c.us"


def chat_key(chat: str) -> str:
    return f"default:{chat}"


def a_used_state_file(path: Path) -> StateStore:
    """What a server leaves when it stops mid-burst: every kind of row the store keeps."""
    store = StateStore(str(path))
    store.initialize()
    answered = incoming(CUSTOMER, ts=100, body="Oi", bare=ANSWERED_ID)
    store.accept(answered)
    first = store.claim_due("old:1:a", limit=1, lease_seconds=3600)[0]
    assert store.begin_send(answered.dedupe_key, "old:1:a", parts=["Olá!"], reply=("Olá!", Outcome.SUCCESS)) == "send"
    store.finish(answered.dedupe_key, first.lease_owner, outcome=Outcome.SUCCESS, sent_message_id="true_x_A1",
                 history=(Turn(role="user", content="Oi"), Turn(role="assistant", content="Olá!")),
                 last_part_id="true_x_A1")
    half_sent = incoming(CUSTOMER, ts=200, body="Me conta tudo")
    store.accept(half_sent)
    store.claim_due("old:1:a", limit=1, lease_seconds=3600)
    store.begin_send(half_sent.dedupe_key, "old:1:a", parts=["parte 1", "parte 2"],
                     reply=("parte 1\n\nparte 2", Outcome.SUCCESS))
    assert store.mark_part_sent(half_sent.dedupe_key, "old:1:a", parts_sent=1, sent_message_id="true_x_P1")
    thinking = incoming(OTHER, ts=300, body="Qual o preço?")
    store.accept(thinking)
    assert store.claim_due("old:2:b", limit=1, lease_seconds=3600)[0].message == thinking
    store.put_media(thinking.dedupe_key, mimetype="audio/ogg", data=bytes(range(256)) * 40)
    store.accept(incoming(OTHER, ts=400, body="e o frete?"))  # queued behind it
    store.pause_chat(chat_key(PAUSED), until=time.time() + 3600, reason="human")
    store.set_opted_out(chat_key(QUIET), True)
    assert store.admit(chat_key(OTHER), texts=["Qual o preço?"], limits=LIMITS).verdict is Verdict.OK
    store.count("ignored.event_not_handled", 7)
    return store


def test_everything_moves_and_the_messages_in_flight_are_due_at_once(tmp_path: Path) -> None:
    state_db = tmp_path / "state.db"
    old = a_used_state_file(state_db)
    before = old.snapshot()
    old.close()
    url = postgres.fresh_database()
    report = migrate_to_postgres(str(state_db), url)
    assert report.open_messages == 3 and report.media_bytes == 256 * 40
    assert report.rows["inbox"] == 4 and report.rows["history"] == 2
    assert not state_db.exists() and Path(report.kept_as).exists() and report.kept_as.endswith(MIGRATED_SUFFIX)
    new = PostgresStore(url)
    try:
        after = new.snapshot()
        assert (after.counters, after.by_status, after.paused, after.opted_out, after.media_bytes) == (
            before.counters, before.by_status, before.paused, before.opted_out, before.media_bytes)
        assert after.counters["messages_received"] == 4 and after.counters["ignored.event_not_handled"] == 7
        # The old server's leases (an hour long) went with it: both replies in progress are due now.
        claimed = {c.message.text: c for c in new.claim_due("new:1:a", limit=10, lease_seconds=30)}
        assert set(claimed) == {"Me conta tudo", "Qual o preço?"}
        half = claimed["Me conta tudo"]
        assert (half.previous_status, half.parts_sent, half.reply_text) == ("sending", 1, "parte 1\n\nparte 2")
        assert claimed["Qual o preço?"].previous_status == "queued"
        media = new.get_media(claimed["Qual o preço?"].message.dedupe_key)
        assert media is not None and media.data == bytes(range(256)) * 40 and media.mimetype == "audio/ogg"
        assert [t.content for t in new.history(chat_key(CUSTOMER), since=0, limit=10)] == ["Oi", "Olá!"]
        assert new.known_sent_ids(["A1", "P1", "unknown"]) == {"A1", "P1"}  # bare ids, as WAHA lists them
        assert new.admit(chat_key(PAUSED), texts=["oi"], limits=LIMITS).verdict is Verdict.PAUSED
        assert new.admit(chat_key(QUIET), texts=["oi"], limits=LIMITS).verdict is Verdict.OPTED_OUT
        assert new.accept(incoming(CUSTOMER, ts=100, body="Oi", bare=ANSWERED_ID)).stored is False  # WAHA's late copy: a duplicate
        # Arrival order within a second survives (SQLite's rowid became PostgreSQL's seq).
        new.finish(claimed["Qual o preço?"].message.dedupe_key, "new:1:a", outcome=Outcome.SUCCESS,
                   sent_message_id="true_x_B1")
        assert [c.message.text for c in new.claim_due("new:1:a", limit=10, lease_seconds=30)] == ["e o frete?"]
    finally:
        new.close()


def test_it_refuses_while_a_server_uses_the_state_file(tmp_path: Path) -> None:
    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    server = StateFileOwner(str(state_db))
    server.acquire()  # what a running server holds
    url = postgres.fresh_database()
    try:
        with pytest.raises(MigrationRefused, match=r"another server \(pid \d+\) is using STATE_DB=.*stop the server"):
            migrate_to_postgres(str(state_db), url)
    finally:
        server.release()
    assert state_db.exists()
    assert migrate_to_postgres(str(state_db), url).rows["inbox"] == 4  # once it stopped


def test_it_refuses_a_database_that_already_holds_messages_and_changes_nothing(tmp_path: Path) -> None:
    url = postgres.fresh_database()
    busy = PostgresStore(url)
    busy.initialize()
    busy.accept(incoming(CUSTOMER, ts=50, body="already here"))
    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    try:
        with pytest.raises(MigrationRefused, match="already holds data .*inbox.*empty database"):
            migrate_to_postgres(str(state_db), url)
        assert state_db.exists() and not os.path.exists(str(state_db) + MIGRATED_SUFFIX)
        assert busy.snapshot().counters["messages_received"] == 1  # nothing was added
    finally:
        busy.close()


def test_it_refuses_what_is_not_a_state_file_and_a_postgresql_source(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:1/none"
    with pytest.raises(MigrationRefused, match="no state file"):
        migrate_to_postgres(str(tmp_path / "missing.db"), url)
    with pytest.raises(MigrationRefused, match="already a PostgreSQL database"):
        migrate_to_postgres(url, url)
    with pytest.raises(MigrationRefused, match="postgresql:// URL"):
        migrate_to_postgres(str(tmp_path / "missing.db"), str(tmp_path / "other.db"))


def test_rows_this_release_has_no_place_for_stop_it_before_anything_moves(tmp_path: Path) -> None:
    import sqlite3

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    with sqlite3.connect(state_db) as connection:
        connection.execute("CREATE TABLE empty_extra (x TEXT)")  # nothing in it: nothing to lose
        connection.execute("CREATE TABLE notes (x TEXT)")
        connection.execute("INSERT INTO notes VALUES ('written by a newer release')")
    url = postgres.fresh_database()
    with pytest.raises(MigrationRefused, match="table 'notes' has no place in PostgreSQL"):
        migrate_to_postgres(str(state_db), url)
    assert state_db.exists()
    check = PostgresStore(url)
    try:
        assert check.snapshot().counters == {}  # the schema was made, no row was copied
    finally:
        check.close()


def test_the_command_line_names_a_missing_state_file_instead_of_creating_one(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    from whatsapp_webhook.cli import main

    missing = tmp_path / "typo.db"
    for name, value in {"STATE_DB": str(missing), "OPENROUTER_API_KEY": "k", "WAHA_API_KEY": "w",
                        "WEBHOOK_ENV_FILE": str(tmp_path / "none.env"), "LOG_FILE": ""}.items():
        monkeypatch.setenv(name, value)
    assert main(["--migrate-to-postgres", "postgresql://postgres@127.0.0.1:1/none"]) == 2
    assert "FAIL migrate: there is no state file at STATE_DB=" in capsys.readouterr().err
    assert not missing.exists()


def test_an_unreachable_target_is_named_as_the_target_and_nothing_moves(tmp_path: Path) -> None:
    from whatsapp_webhook.settings import SettingsError

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    with pytest.raises(SettingsError, match=r"cannot reach the PostgreSQL server of the target database .*fix the URL"
                       ) as error:
        migrate_to_postgres(str(state_db), "postgresql://bot:segredo@127.0.0.1:1/bot", timeout=2)
    assert "segredo" not in str(error.value)  # the password never shows
    assert state_db.exists()


def cli_env(monkeypatch, tmp_path: Path, state_db: Path) -> None:
    for name, value in {"STATE_DB": str(state_db), "OPENROUTER_API_KEY": "k", "WAHA_API_KEY": "w",
                        "WEBHOOK_ENV_FILE": str(tmp_path / "none.env"), "LOG_FILE": ""}.items():
        monkeypatch.setenv(name, value)


def test_the_old_path_is_refused_after_the_move_instead_of_becoming_a_new_empty_state_file(
        tmp_path: Path, monkeypatch, capsys) -> None:
    from whatsapp_webhook.cli import main
    from whatsapp_webhook.settings import SettingsError

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    migrate_to_postgres(str(state_db), postgres.fresh_database())
    # A server started with the old settings, or a check: no new file on the old path, and it says why.
    for open_it in (StateStore(str(state_db)).initialize, StateStore(str(state_db)).check_usable):
        with pytest.raises(SettingsError, match=r"was moved to PostgreSQL by --migrate-to-postgres: set STATE_DB to "
                                                r"that postgresql:// URL, or delete .*state\.db\.migrated-to-postgresql"):
            open_it()
    cli_env(monkeypatch, tmp_path, state_db)
    assert main(["--check-settings"]) == 2
    assert "moved to PostgreSQL by --migrate-to-postgres" in capsys.readouterr().err
    assert not state_db.exists()
    os.remove(str(state_db) + MIGRATED_SUFFIX)  # what the message says to do to start afresh
    StateStore(str(state_db)).initialize()
    assert state_db.exists()


def test_a_commit_refused_by_postgresql_puts_the_state_file_back_and_a_lost_commit_leaves_it_refused(
        tmp_path: Path, monkeypatch) -> None:
    import psycopg

    from whatsapp_webhook.settings import SettingsError
    from whatsapp_webhook.sqlite_base import MIGRATING_SUFFIX

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    url = postgres.fresh_database()
    seen_at_commit: list[tuple[bool, bool]] = []
    real_commit = psycopg.Connection.commit

    def refused_commit(self: psycopg.Connection) -> None:
        seen_at_commit.append((state_db.exists(), os.path.exists(str(state_db) + MIGRATING_SUFFIX)))
        self.execute("SELECT 1/0")  # PostgreSQL refuses: the transaction is rolled back, the connection lives

    monkeypatch.setattr(psycopg.Connection, "commit", refused_commit)
    with pytest.raises(SettingsError, match="nothing was moved"):
        migrate_to_postgres(str(state_db), url)
    assert seen_at_commit == [(False, True)]  # renamed away from STATE_DB before the commit
    assert state_db.exists() and not os.path.exists(str(state_db) + MIGRATING_SUFFIX)  # and back after
    StateStore(str(state_db)).check_usable()  # still the state file

    def lost_commit(self: psycopg.Connection) -> None:
        real_commit(self)  # it happened, but the answer never came back
        self.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.Connection, "commit", lost_commit)
    monkeypatch.setattr(psycopg.Connection, "broken", property(lambda self: True))
    with pytest.raises(SettingsError, match="broke during the commit.*migrating-to-postgresql"):
        migrate_to_postgres(str(state_db), url)
    monkeypatch.undo()
    assert not state_db.exists()  # no usable full file beside the full database
    with pytest.raises(SettingsError, match="--migrate-to-postgres of STATE_DB .* was interrupted"):
        StateStore(str(state_db)).initialize()
    assert not state_db.exists()


def test_the_command_line_names_a_state_file_folder_it_cannot_use(tmp_path: Path, monkeypatch, capsys) -> None:
    from whatsapp_webhook.cli import main

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    os.mkdir(str(state_db) + ".server.lock")  # the claim cannot be taken: an OSError, not a traceback
    cli_env(monkeypatch, tmp_path, state_db)
    assert main(["--migrate-to-postgres", "postgresql://postgres@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "FAIL migrate: STATE_DB" in err and "cannot be moved" in err and "Traceback" not in err
    assert state_db.exists()


def test_a_media_download_in_progress_is_due_at_once_on_postgresql(tmp_path: Path) -> None:
    import dataclasses

    from whatsapp_webhook.store_api import MediaJobState

    state_db = tmp_path / "state.db"
    old = StateStore(str(state_db))
    old.initialize()
    voice = dataclasses.replace(incoming(CUSTOMER, ts=100, body="áudio"), media_url="http://waha:3000/api/files/a.oga",
                                media_mimetype="audio/ogg")
    old.accept(voice)
    assert [j.key for j in old.claim_media_jobs("old:1:a", limit=5, lease_seconds=3600)] == [voice.dedupe_key]
    old.close()  # the old server died mid-download: its job is 'fetching' with an hour-long lease
    url = postgres.fresh_database()
    migrate_to_postgres(str(state_db), url)
    new = PostgresStore(url)
    try:
        status = new.media_job(voice.dedupe_key)
        assert status is not None and status.state is MediaJobState.PENDING
        assert [j.key for j in new.claim_media_jobs("new:1:a", limit=5, lease_seconds=30)] == [voice.dedupe_key]
    finally:
        new.close()


def test_a_worker_left_by_a_killed_server_cannot_write_to_the_file_while_it_moves(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import sqlite3

    import psycopg

    state_db = tmp_path / "state.db"
    a_used_state_file(state_db).close()
    orphan = sqlite3.connect(state_db, timeout=0, isolation_level=None)  # its master is gone, it is not
    refused: list[str] = []
    real_commit = psycopg.Connection.commit

    def commit_after_a_write_attempt(self: psycopg.Connection) -> None:
        try:
            orphan.execute("UPDATE inbox SET status = 'done' WHERE status = 'queued'")
        except sqlite3.OperationalError as exc:
            refused.append(str(exc))
        real_commit(self)

    monkeypatch.setattr(psycopg.Connection, "commit", commit_after_a_write_attempt)
    try:
        migrate_to_postgres(str(state_db), postgres.fresh_database())
    finally:
        orphan.close()
    assert refused and set(refused) == {"database is locked"}  # the lock is held up to the commit


def test_two_migrations_into_one_database_at_once_move_one_file(tmp_path: Path) -> None:
    import concurrent.futures
    import threading

    url = postgres.fresh_database()
    PostgresStore(url, pooled=False).initialize()  # the schema exists: both go straight to the copy
    files = [tmp_path / "a" / "state.db", tmp_path / "b" / "state.db"]
    for path in files:
        path.parent.mkdir()
        a_used_state_file(path).close()
    start = threading.Barrier(2)

    def migrate(path: Path) -> str:
        start.wait()
        try:
            migrate_to_postgres(str(path), url)
        except MigrationRefused as exc:
            return str(exc)
        return "moved"

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = sorted(pool.map(migrate, files))
    assert results[0] == "moved" and "already holds data" in results[1], results
    assert sum(path.exists() for path in files) == 1  # the refused one is still a state file
