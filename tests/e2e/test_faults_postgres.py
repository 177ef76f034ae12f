"""The fault suite's core cases, unchanged, with STATE_DB pointing at the test session's PostgreSQL server:
a burst with duplicates, kill -9 of a worker mid-reply, and restarts (kill -9 of the whole server, SIGTERM).

Every server started here gets a database of its own (tests/postgres.py); a restart keeps it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests import postgres
from tests.e2e.test_faults import (  # noqa: F401 - pytest collects these tests and the fixture here too
    fault_server,
    test_burst_of_200_deliveries_answers_50_messages_once_each_in_chat_order,
    test_kill_9_of_the_whole_server_mid_reply_and_restart,
    test_kill_9_of_the_worker_thinking_about_a_reply,
    test_kill_9_of_the_worker_while_waha_is_sending,
    test_sigterm_mid_reply_hands_it_back_and_the_next_start_finishes_it,
)
from tests.e2e.test_gunicorn import stats

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
