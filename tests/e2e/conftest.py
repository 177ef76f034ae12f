"""Real gunicorn processes (2 workers) talking over loopback to the shipped fake WAHA and fake OpenRouter."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeOpenRouter, FakeWaha

REPO = Path(__file__).resolve().parents[2]
WAHA_KEY = "e2e-waha-key"
LLM_KEY = "e2e-llm-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GunicornServer:
    """One `gunicorn -c gunicorn.conf.py whatsapp_webhook_server:app` with its own state file and log."""

    def __init__(self, folder: Path, env: dict[str, str], *, workers: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = folder / "webhook.log"
        self.output = folder / "gunicorn.out"
        empty_env_file = folder / "empty.env"
        empty_env_file.write_text("")
        self.state_db = str(folder / "state.db")
        # Only what a process needs from this shell: a developer's exported settings must not leak in.
        inherited = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        self.env = {**inherited, "STATE_DB": self.state_db, "LOG_FILE": str(self.log_file),
                    "WEBHOOK_ENV_FILE": str(empty_env_file), "TYPING_SIMULATION": "false",
                    "WEBHOOK_SYNC_WAIT_SECONDS": "5",
                    # Delivery tests send many similar messages from one customer quickly; the conversation
                    # rules (debounce, limits, loop detection) have their own tests with their defaults.
                    "DEBOUNCE_SECONDS": "0", "RATE_LIMIT_PER_MINUTE": "100000", "DAILY_MESSAGE_LIMIT": "1000000",
                    "LOOP_REPEATS": "1000", **env}
        self.command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{self.port}",
                        "-w", str(workers), "whatsapp_webhook_server:app"]
        self.process: subprocess.Popen[bytes] | None = None

    def pid_working_on(self, event_id: str, timeout: float = 10.0) -> int:
        """The worker that took this message, from its 'decision=working' log line."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"\[pid (\d+)\].*event={re.escape(event_id)} .*decision=working")
        while time.monotonic() < deadline:
            if found := pattern.findall(self.log_text()):
                return int(found[-1])
            time.sleep(0.05)
        raise AssertionError(f"no worker started on {event_id}:\n{self.tail()}")

    def start(self, *, wait: bool = True) -> GunicornServer:
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group, so a test can kill it whole
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not become healthy:\n{self.tail()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


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
        server = GunicornServer(folder, {**upstream_env(fake_waha, fake_llm), **env}, workers=workers)
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
