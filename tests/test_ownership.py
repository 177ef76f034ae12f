"""One server per state file: the claim, what a second server is told, and that kill -9 never leaves it stuck."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time

import pytest

from whatsapp_webhook.ownership import StateFileBusy, StateFileOwner, port_in_use_message


def _master(state_db: str, ready, with_worker: bool, worker_pid) -> None:
    """A stand-in for gunicorn's master: takes the claim, maybe forks a worker that closes its copy."""
    owner = StateFileOwner(state_db)
    owner.acquire()
    if with_worker:
        child = os.fork()
        if child == 0:  # the worker: forget the claim, then live on (as an orphaned worker would, briefly)
            owner.forget_in_child()
            time.sleep(30)
            os._exit(0)
        worker_pid.value = child
    ready.set()
    time.sleep(30)


def start_master(state_db: str, *, with_worker: bool = False):
    context = multiprocessing.get_context("fork")
    ready, worker_pid = context.Event(), context.Value("i", 0)
    master = context.Process(target=_master, args=(state_db, ready, with_worker, worker_pid))
    master.start()
    assert ready.wait(10)
    return master, worker_pid


def test_a_second_claim_is_refused_naming_the_owner(tmp_path) -> None:
    state_db = str(tmp_path / "state.db")
    master, _ = start_master(state_db)
    try:
        with pytest.raises(StateFileBusy, match=rf"another server \(pid {master.pid}\) is using STATE_DB="):
            StateFileOwner(state_db).acquire()
    finally:
        master.kill()
        master.join(10)


def test_kill_9_of_the_master_frees_the_file_even_while_a_worker_lives_on(tmp_path) -> None:
    state_db = str(tmp_path / "state.db")
    master, worker_pid = start_master(state_db, with_worker=True)
    try:
        os.kill(master.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while master.is_alive() and time.monotonic() < deadline:  # not join(): the worker holds its sentinel
            time.sleep(0.02)
        assert os.kill(worker_pid.value, 0) is None  # the worker is still alive...
        owner = StateFileOwner(state_db)
        owner.acquire()  # ...and the next start is not refused
        assert (tmp_path / "state.db.server.lock").read_text().strip() == str(os.getpid())
        owner.release()
    finally:
        os.kill(worker_pid.value, signal.SIGKILL)


def test_the_claim_is_a_file_of_its_own_not_the_database_or_the_write_gate(tmp_path) -> None:
    owner = StateFileOwner(str(tmp_path / "state.db"))
    owner.acquire()
    try:
        assert owner.path.endswith("state.db.server.lock")
        assert not (tmp_path / "state.db").exists() and not (tmp_path / "state.db.lock").exists()
    finally:
        owner.release()
    StateFileOwner(str(tmp_path / "state.db")).acquire()  # released: free again


def test_a_port_in_use_is_named_with_how_to_find_who_has_it() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        message = port_in_use_message("127.0.0.1", port)
    assert message and f"WEBHOOK_PORT={port}" in message and f"sport = :{port}" in message
    assert port_in_use_message("127.0.0.1", port) is None  # closed: free again
