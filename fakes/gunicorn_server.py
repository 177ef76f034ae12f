"""The real server under gunicorn, for the tests, the demo and the bench: one way to start, wait for and stop it.

    server = GunicornServer(folder, {"WAHA_BASE_URL": fake_waha.url, ...}, workers=2).start()
    ...
    server.stop()

It runs `python -m gunicorn -c gunicorn.conf.py -b 127.0.0.1:PORT -w N whatsapp_webhook_server:app` from the
repository root in its own process group, with a clean environment: only PATH, HOME, LANG, LC_ALL and TMPDIR
come from this shell (a developer's exported settings and .env.webhook must not leak in), then the server's
own files in `folder` (STATE_DB, LOG_FILE, an empty WEBHOOK_ENV_FILE), then what the caller passes, which wins.
gunicorn's output goes to `folder/gunicorn.out`. Another app or config file can be given (the bench runs its
baselines this way).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
APP = "whatsapp_webhook_server:app"
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def free_port() -> int:
    """A loopback port nobody listens on now (another process may still take it before gunicorn binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """Only what a process needs from this shell."""
    return {k: v for k, v in os.environ.items() if k in INHERITED}


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL to its whole process group (started with start_new_session) after `timeout` s.

    Returns its exit status: -9 when it had to be killed.
    """
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: group id = its pid
        except ProcessLookupError:
            pass
        return process.wait()


def last_lines(path: Path, lines: int) -> str:
    """The end of a process's output file ("" before it exists)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def health_ok(http: httpx.Client) -> bool:
    return http.get("/health").status_code == 200


class GunicornError(RuntimeError):
    """gunicorn exited or did not become ready; the message ends with the last lines of its output."""


class GunicornServer:
    """One gunicorn with its own state file, log file and output file in `folder`.

    `ready` says when it serves (default: GET /health answers 200); `stop_timeout` is how long SIGTERM gets
    before the whole process group is killed.
    """

    def __init__(self, folder: Path, env: Mapping[str, str] | None = None, *, workers: int = 2, app: str = APP,
                 config: str = "gunicorn.conf.py", options: Sequence[str] = (),
                 ready: Callable[[httpx.Client], bool] = health_ok, stop_timeout: float = 40.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log_file = folder / "webhook.log"
        self.output = folder / "gunicorn.out"
        self.state_db = str(folder / "state.db")
        empty_env_file = folder / "empty.env"
        empty_env_file.write_text("")
        self.env = {**clean_env(), "STATE_DB": self.state_db, "LOG_FILE": str(self.log_file),
                    "WEBHOOK_ENV_FILE": str(empty_env_file), **(env or {})}
        self.workers, self.app, self.config, self.options = workers, app, config, list(options)
        self.ready, self.stop_timeout = ready, stop_timeout
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", self.config, *self.options, "-b", f"127.0.0.1:{self.port}",
                "-w", str(self.workers), self.app]

    def start(self, *, wait: bool = True, timeout: float = 30.0, attempts: int = 3) -> GunicornServer:
        """Start it (again: same port and state file); with `wait`, return once it is ready.

        The port was free when picked, but another process may bind it first: gunicorn then exits with
        "Address already in use", and it is started again on a new port, `attempts` times at most.
        """
        problem: str | None = "gunicorn was not started (attempts=0)"
        for attempt in range(attempts):
            if attempt:
                self.port = free_port()
            written = self.output.stat().st_size if self.output.exists() else 0
            with open(self.output, "ab") as out:
                # Its own process group: Ctrl-C reaches only the caller, and stop() can kill master and workers.
                self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            if not wait:
                return self
            problem = self._wait_ready(timeout)
            if problem is None:
                return self
            stop_process(self.process, self.stop_timeout)
            if "already in use" not in self.output.read_bytes()[written:].decode(errors="replace"):
                break
        raise GunicornError(f"{problem}:\n{self.tail()}")

    def _wait_ready(self, timeout: float) -> str | None:
        """None once `ready` holds; otherwise what went wrong."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return f"gunicorn exited with {self.process.returncode}"
                try:
                    if self.ready(http):
                        return None
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return f"gunicorn did not become ready within {timeout:g} s"

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (graceful: workers finish or hand back what is in flight), then SIGKILL to the whole group.

        Returns gunicorn's exit status (-9 when it had to be killed), None if it was never started.
        """
        if self.process is None:
            return None
        return stop_process(self.process, self.stop_timeout if timeout is None else timeout)

    def tail(self, lines: int = 40) -> str:
        """The last lines gunicorn printed (every start appends to the same file)."""
        return last_lines(self.output, lines)

    def log_text(self) -> str:
        """The server's LOG_FILE so far ("" when there is none yet, or LOG_FILE was set empty)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def pid_working_on(self, event_id: str, timeout: float = 10.0) -> int:
        """The worker that took this message, from its 'decision=working' log line."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"\[pid (\d+)\].*event={re.escape(event_id)} .*decision=working")
        while time.monotonic() < deadline:
            if found := pattern.findall(self.log_text()):
                return int(found[-1])
            time.sleep(0.05)
        raise AssertionError(f"no worker started on {event_id}:\n{self.tail()}")
