"""The media cases that start their own server, unchanged, with STATE_DB on the test session's PostgreSQL server:
the media queue and the bytes live in PostgreSQL (kill -9 and restart, a photo + text burst, an oversize file)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests import postgres
from tests.e2e.test_media import (  # noqa: F401 - pytest collects these tests here too
    test_a_photo_then_a_question_is_one_llm_call_and_one_reply,
    test_an_oversize_file_gets_the_unavailable_reply_and_is_not_read_past_the_cap,
    test_kill_9_after_the_message_is_recorded_the_reply_still_carries_the_media,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def start_server(start_server: Callable[..., Any]) -> Callable[..., Any]:
    """The session's start_server, each server on a fresh PostgreSQL database."""

    def start(**env: str) -> Any:
        server = start_server(**{"STATE_DB": postgres.fresh_database(), **env})
        assert server.env["STATE_DB"].startswith("postgresql://")
        return server

    return start
