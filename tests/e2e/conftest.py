"""Real gunicorn processes (2 workers, fakes.gunicorn_server) talking over loopback to the fake WAHA and LLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fakes import FakeOpenRouter, FakeWaha
from fakes.gunicorn_server import GunicornServer

WAHA_KEY = "e2e-waha-key"
LLM_KEY = "e2e-llm-key"
# Delivery tests send many similar messages from one customer quickly; the conversation rules (debounce,
# limits, loop detection) have their own tests with their defaults.
E2E_ENV = {"TYPING_SIMULATION": "false", "WEBHOOK_SYNC_WAIT_SECONDS": "5", "DEBOUNCE_SECONDS": "0",
           "RATE_LIMIT_PER_MINUTE": "100000", "DAILY_MESSAGE_LIMIT": "1000000", "LOOP_REPEATS": "1000"}


@pytest.fixture(scope="session")
def fake_waha() -> Iterator[FakeWaha]:
    with FakeWaha(api_key=WAHA_KEY, engine="WEBJS") as waha:
        yield waha


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter(api_key=LLM_KEY) as llm:
        yield llm


def upstream_env(fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> dict[str, str]:
    return {"WAHA_BASE_URL": fake_waha.url, "WAHA_API_KEY": WAHA_KEY,
            "OPENROUTER_BASE_URL": fake_llm.url + "/api/v1", "OPENROUTER_API_KEY": LLM_KEY}


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory, fake_waha: FakeWaha,
                 fake_llm: FakeOpenRouter) -> Iterator[Any]:
    servers: list[GunicornServer] = []

    def start(*, wait: bool = True, workers: int = 2, **env: str) -> GunicornServer:
        folder = tmp_path_factory.mktemp("gunicorn")
        server = GunicornServer(folder, {**E2E_ENV, **upstream_env(fake_waha, fake_llm), **env}, workers=workers)
        servers.append(server)
        return server.start(wait=wait)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Any) -> GunicornServer:
    """The default deployment most tests share: 2 workers, no signature checks."""
    return start_server()


@pytest.fixture(autouse=True)
def clean_fakes(fake_waha: FakeWaha, fake_llm: FakeOpenRouter) -> None:
    fake_waha.reset()
    fake_llm.reset()
