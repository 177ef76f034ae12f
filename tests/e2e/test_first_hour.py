"""A new user's first hour: a second start that must not touch the running server, clear mistakes.

Each runs the real commands (the start script, gunicorn, the development server) over loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fakes import waha_payloads as wp
from fakes.gunicorn_server import REPO, clean_env, free_port
from tests.e2e.conftest import E2E_ENV, upstream_env

pytestmark = pytest.mark.e2e
WEBHOOK = "/api/v1/whatsapp/webhook"


def command_env(fake_waha, fake_llm, folder: Path, **env: str) -> dict[str, str]:
    """What a user's shell would have for a second start: the same settings, no .env.webhook of a developer."""
    (folder / "empty.env").write_text("")
    return {**clean_env(), "WEBHOOK_ENV_FILE": str(folder / "empty.env"), "LOG_FILE": str(folder / "second.log"),
            "VENV_DIR": sys.prefix, "PIP_NO_INDEX": "1", **E2E_ENV, **upstream_env(fake_waha, fake_llm), **env}


def one_line_without_traceback(output: str, words: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if words in line]
    assert len(lines) == 1, output
    return lines[0]


def test_a_second_start_on_the_same_state_file_is_refused_and_the_running_reply_is_untouched(
        start_server, fake_waha, fake_llm, tmp_path) -> None:
    first = start_server()
    fake_llm.add_fault("/chat/completions", delay_s=4.0)  # the reply is in flight while the second start runs
    envelope = wp.text_message("WEBJS", body="Vocês abrem no feriado?")
    answer: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
        first.url + WEBHOOK, content=wp.dumps(envelope), headers={"Content-Type": "application/json"}, timeout=30)))
    sender.start()
    first.pid_working_on(envelope["id"])

    second = subprocess.run(["./start_webhook_server.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=command_env(fake_waha, fake_llm, tmp_path, STATE_DB=first.state_db,
                                            WEBHOOK_PORT=str(free_port()), WEBHOOK_HOST="127.0.0.1"))
    output = second.stdout + second.stderr
    print(output)
    assert second.returncode != 0
    line = one_line_without_traceback(output, "is using STATE_DB")
    assert f"another server (pid {first.process.pid})" in line

    sender.join(30)
    assert answer["r"].json()["status"] == "processed"
    assert [sent["text"] for sent in fake_waha.sent_texts()] == ["Echo: Vocês abrem no feriado?"]
    assert len(fake_llm.completions()) == 1
    assert "decision=lost" not in first.log_text() and "recovering" not in first.log_text()


def test_a_port_in_use_is_one_clear_line_for_gunicorn_and_for_the_development_server(
        start_server, fake_waha, fake_llm, tmp_path) -> None:
    running = start_server()
    env = command_env(fake_waha, fake_llm, tmp_path, STATE_DB=str(tmp_path / "other.db"), WEBHOOK_HOST="127.0.0.1",
                      WEBHOOK_PORT=str(running.port))
    started = time.monotonic()
    gunicorn = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "whatsapp_webhook_server:app"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    print(gunicorn.stderr)
    assert gunicorn.returncode != 0 and time.monotonic() - started < 5  # not gunicorn's five retries
    line = one_line_without_traceback(gunicorn.stdout + gunicorn.stderr, "already in use")
    assert f"WEBHOOK_PORT={running.port}" in line and "ss -ltnp" in line
    assert "Connection in use" not in gunicorn.stderr

    development = subprocess.run([sys.executable, "whatsapp_webhook_server.py"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
    print(development.stderr)
    assert development.returncode == 2
    assert f"WEBHOOK_PORT={running.port}" in one_line_without_traceback(
        development.stdout + development.stderr, "already in use")
    assert httpx.get(running.url + "/health", timeout=5).status_code == 200  # the running one never noticed


def test_the_development_server_also_refuses_a_state_file_in_use(start_server, fake_waha, fake_llm,
                                                                  tmp_path) -> None:
    running = start_server()
    env = command_env(fake_waha, fake_llm, tmp_path, STATE_DB=running.state_db, WEBHOOK_HOST="127.0.0.1",
                      WEBHOOK_PORT=str(free_port()))
    development = subprocess.run([sys.executable, "whatsapp_webhook_server.py"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
    assert development.returncode == 2
    assert f"pid {running.process.pid}" in one_line_without_traceback(
        development.stdout + development.stderr, "is using STATE_DB")
    # --check and --check-settings never take the state file: they work beside a running server.
    check = subprocess.run([sys.executable, "whatsapp_webhook_server.py", "--check-settings"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_settings_that_look_like_ours_but_are_not_get_a_warning_with_the_right_name(
        fake_waha, fake_llm, tmp_path) -> None:
    env = command_env(fake_waha, fake_llm, tmp_path, STATE_DB=str(tmp_path / "state.db"),
                      REPLY_IN_GROUP="true", TYPING_SIMULATON="false", WAHA_DASHBOARD_PASSWORD="not-ours")
    check = subprocess.run([sys.executable, "whatsapp_webhook_server.py", "--check-settings"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    print(check.stdout)
    assert check.returncode == 0
    assert "WARN REPLY_IN_GROUP is not a setting of this server (ignored); did you mean REPLY_IN_GROUPS?" \
        in check.stdout
    assert "did you mean TYPING_SIMULATION?" in check.stdout
    assert "WAHA_DASHBOARD_PASSWORD" not in check.stdout and "not-ours" not in check.stdout
    port = free_port()
    env.update(WEBHOOK_HOST="127.0.0.1", WEBHOOK_PORT=str(port))
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "1",
                               "whatsapp_webhook_server:app"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        os.killpg(server.pid, 15)
        output = server.communicate(timeout=40)[0]
    assert "warning: REPLY_IN_GROUP is not a setting of this server (ignored); did you mean REPLY_IN_GROUPS?" \
        in output


@pytest.mark.parametrize("value, words", [
    ("mysql://bot@db/bot", "STATE_DB must be a file path for the SQLite state file"),
    ("{folder}", "STATE_DB is the folder"),
    ("postgresql://bot:secret@127.0.0.1:1/bot",  # nothing listens on port 1
     "cannot reach the PostgreSQL server of STATE_DB postgresql://bot:***@127.0.0.1:1/bot"),
])
def test_a_state_db_that_is_not_a_usable_file_stops_the_start(fake_waha, fake_llm, tmp_path, value, words) -> None:
    env = command_env(fake_waha, fake_llm, tmp_path, STATE_DB=value.format(folder=tmp_path))
    check = subprocess.run([sys.executable, str(REPO / "whatsapp_webhook_server.py"), "--check-settings"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and words in check.stderr and "secret" not in check.stderr
    assert not (tmp_path / "mysql:").exists() and not (tmp_path / "postgresql:").exists()


def test_the_control_socket_is_the_servers_own(tmp_path, fake_waha, fake_llm) -> None:
    env = command_env(fake_waha, fake_llm, tmp_path, STATE_DB=str(tmp_path / "state.db"))
    printed = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config",
                              "whatsapp_webhook_server:app"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
    config = {key.strip(): value.strip() for key, _, value in (line.partition(" = ") for line in printed.stdout.splitlines())}
    socket_path = Path(config["control_socket"].strip())
    try:
        assert socket_path.name == "gunicorn.ctl" and socket_path.parent.name.startswith("whatsapp-webhook-run-")
        assert ".gunicorn" not in socket_path.parts
    finally:
        if socket_path.parent.name.startswith("whatsapp-webhook-run-"):
            socket_path.parent.rmdir()
    assert len(str(socket_path)) < 100  # a Unix socket path longer than ~108 bytes cannot be bound
