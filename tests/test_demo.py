"""Smoke test of the no-account demo (`./start_webhook_server.sh demo`): it runs, passes its own checks, and
its transcript shows the flow a newcomer is promised."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import waha_payloads as wp

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo() -> tuple[subprocess.CompletedProcess[str], float]:
    # A clean environment, like a fresh machine: no exported settings, UTF-8 output.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env["PYTHONIOENCODING"] = "utf-8"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "demo.run_demo"], cwd=REPO, env=env, capture_output=True,
                            text=True, encoding="utf-8", timeout=120)
    return result, time.monotonic() - started


def test_demo_passes_its_own_checks_quickly(demo) -> None:
    result, elapsed = demo
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "RESULTADO: tudo como esperado" in result.stdout
    assert "[FALHOU]" not in result.stdout
    assert elapsed < 60


def test_transcript_shows_the_whole_flow(demo) -> None:
    out = demo[0].stdout
    # @lid customer: answered, and the reply went to the @lid id itself.
    assert f"o cliente recebeu no WhatsApp ({wp.CUSTOMER_LID}): \"Entregamos sim!" in out
    assert f"POST /api/sendText    chatId={wp.CUSTOMER_LID}  -> HTTP 201" in out
    # The same message again as message.any: ignored as a duplicate, nothing sent twice.
    assert "evento WAHA: message.any" in out
    assert "status=ignored reason=duplicate" in out
    assert "decision=ignored reason=duplicate" in out
    # Group ignored with its reason; the ack is not a message; a voice note and a photo; LLM down -> fallback.
    assert "reason=group_chat (group messages are not answered (REPLY_IN_GROUPS=false))" in out
    assert "decision=ignored reason=event_not_handled" in out
    assert "grava um áudio" in out and "manda uma foto" in out
    assert "Funcionamos de segunda a sexta" in out  # the voice note asked for the opening hours
    assert "[[nota]]" not in out.split("=== /stats")[0].split("o cliente recebeu")[-1]
    assert "respostas HTTP 503, 503, 503" in out
    assert "decision=replied outcome=fallback" in out
    # Typing simulation shows up as WAHA calls.
    for path in ("/api/sendSeen", "/api/startTyping", "/api/stopTyping"):
        assert f"POST {path}" in out
    assert "ignored_by_reason: {'duplicate': 1, 'event_not_handled': 1, 'group_chat': 1}" in out


def test_nothing_left_behind(demo) -> None:
    out = demo[0].stdout
    folder = next(line.split()[2] for line in out.splitlines() if line.strip().startswith("pasta temporária:"))
    assert not Path(folder).exists()
