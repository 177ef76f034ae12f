"""The fault suite's core cases, unchanged, with STATE_DB pointing at the test session's PostgreSQL server:
a burst with duplicates, kill -9 of a worker mid-reply, and restarts (kill -9 of the whole server, SIGTERM).

One case differs on purpose: after kill -9 of the whole server, a server starting on PostgreSQL cannot tell
the dead server's leases from a live host's (several hosts may share the database), so it takes the
message over when its lease runs out instead of at once (tests/e2e/test_several_hosts.py has the hosts).

Every server started here gets a database of its own (tests/postgres.py); a restart keeps it.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from fakes import waha_payloads as wp
from tests import postgres
from tests.e2e.test_faults import (  # noqa: F401 - pytest collects these tests and the fixture here too
    FAULT_ENV,
    assert_stats_add_up,
    customer_texts,
    fault_server,
    test_burst_of_200_deliveries_answers_50_messages_once_each_in_chat_order,
    test_kill_9_of_the_worker_thinking_about_a_reply,
    test_kill_9_of_the_worker_while_waha_is_sending,
    test_sigterm_mid_reply_hands_it_back_and_the_next_start_finishes_it,
)
from tests.e2e.test_gunicorn import deliver, stats, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def start_server(start_server: Callable[..., Any]) -> Callable[..., Any]:
    """The session's start_server, each server on a fresh PostgreSQL database."""

    def start(**env: str) -> Any:
        return start_server(**{"STATE_DB": postgres.fresh_database(), **env})

    return start


def test_the_server_really_runs_on_postgresql(fault_server) -> None:  # noqa: F811 - the imported fixture
    assert fault_server.env["STATE_DB"].startswith("postgresql://")
    assert "messages_received" in stats(fault_server)
    assert not list(fault_server.folder.glob("*.db*"))  # no SQLite file, no lock file named after a URL


def test_kill_9_of_the_whole_server_mid_reply_and_restart_answers_once_its_lease_runs_out(
        start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**FAULT_ENV, "WEBHOOK_SYNC_WAIT_SECONDS": "0.5", "LEASE_SECONDS": "4"})
    envelope = wp.text_message("NOWEB", body="Queda de energia")
    fake_llm.add_fault("/chat/completions", delay_s=30, times=0)
    assert deliver(server, envelope).status_code == 202
    server.pid_working_on(envelope["id"])
    os.killpg(server.process.pid, signal.SIGKILL)  # master and workers at once, like a power cut
    server.process.wait()
    fake_llm.clear_faults()
    server.start()  # its lease may still be valid: it is taken over when it runs out, not by the start
    chat = envelope["payload"]["from"]
    wait_for(lambda: customer_texts(fake_waha, chat), timeout=30)
    time.sleep(1.5)
    assert customer_texts(fake_waha, chat) == ["Echo: Queda de energia"]
    assert "decision=working attempt=2" in server.log_text()
    assert_stats_add_up(server)
