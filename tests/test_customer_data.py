"""A customer's data on request (LGPD) from the command line: --export-chat prints what is stored about a chat,
--forget-chat deletes it and says what it deleted, and a redelivery of a forgotten message is still not answered
twice. The store side, on both backends, is in test_store_contract.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fakes import waha_payloads as wp
from tests.conftest import LLM_BASE, LLM_KEY, WAHA_BASE, WAHA_KEY, post_event
from whatsapp_webhook import cli


@pytest.fixture
def command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `python whatsapp_webhook_server.py ARGS` against the test app's STATE_DB; returns (exit code, stdout)."""
    for name, value in {"OPENROUTER_API_KEY": LLM_KEY, "OPENROUTER_BASE_URL": LLM_BASE, "WAHA_BASE_URL": WAHA_BASE,
                        "WAHA_API_KEY": WAHA_KEY, "STATE_DB": str(tmp_path / "state.db"), "LOG_FILE": "",
                        "WEBHOOK_ENV_FILE": str(tmp_path / "no.env")}.items():
        monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        return code, capsys.readouterr().out


    return run


def test_export_then_forget_leaves_no_trace_and_no_second_answer(make_app, upstreams, command_line,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    client = make_app().test_client()
    said = wp.text_message("WEBJS", sender=wp.CUSTOMER_PN, body="Meu endereço é Rua A, 10", message_id="3EB0LGPD1")
    post_event(client, said)
    post_event(client, wp.text_message("WEBJS", sender=wp.OTHER_PN, body="Outro cliente"))

    code, printed = command_line("--export-chat", wp.CUSTOMER_PN)
    exported = json.loads(printed)
    assert code == 0 and exported["chat_key"] == f"default:{wp.CUSTOMER_PN}"
    assert [m["message"]["text"] for m in exported["messages"]] == ["Meu endereço é Rua A, 10"]
    assert [t["content"] for t in exported["history"]] == ["Meu endereço é Rua A, 10", "Echo: Meu endereço é Rua A, 10"]
    assert "Outro cliente" not in printed

    code, printed = command_line("--forget-chat", wp.CUSTOMER_PN.split("@")[0])  # a bare number works too
    with capsys.disabled():  # the operator's transcript, with -s
        print(f"\n$ python whatsapp_webhook_server.py --forget-chat {wp.CUSTOMER_PN.split('@')[0]}\n{printed}")
    assert code == 0 and printed.startswith(f"forgot {wp.CUSTOMER_PN} in session default:")
    assert "deleted 2 row(s) from history" in printed and "kept 1 answered message key(s)" in printed

    code, printed = command_line("--export-chat", wp.CUSTOMER_PN)
    assert json.loads(printed) == {"chat_key": f"default:{wp.CUSTOMER_PN}", "messages": [], "history": [],
                                   "chat_state": None, "marks": {}, "media": [], "downloads": [],
                                   "sent": []}
    # WAHA redelivers the forgotten message: recognised, not answered again.
    answered_before = len(upstreams.sent_texts())
    assert post_event(client, said).get_json()["reason"] == "duplicate"
    assert len(upstreams.sent_texts()) == answered_before
    assert command_line("--forget-chat", wp.CUSTOMER_PN)[1].strip() == (
        f"nothing stored about {wp.CUSTOMER_PN} in session default")


def test_the_session_option_picks_the_number(make_app, upstreams, command_line) -> None:
    client = make_app().test_client()
    post_event(client, wp.text_message("WEBJS", sender=wp.CUSTOMER_PN, body="Na loja 2", session="loja2"))
    assert json.loads(command_line("--export-chat", wp.CUSTOMER_PN)[1])["messages"] == []
    exported = json.loads(command_line("--export-chat", wp.CUSTOMER_PN, "--session", "loja2")[1])
    assert exported["messages"][0]["message"]["text"] == "Na loja 2"
    assert command_line("--forget-chat", "5511000000000", "--session", "loja2")[1].startswith("nothing stored about")


def test_forgotten_words_are_gone_from_the_sqlite_files_bytes(make_app, upstreams, command_line,
                                                              tmp_path: Path) -> None:
    client = make_app().test_client()
    secret = "Meu CPF é 987.654.321-00"
    post_event(client, wp.text_message("WEBJS", sender=wp.CUSTOMER_PN, body=secret))
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*") if p.is_file())
    assert b"987.654.321-00" in on_disk  # it was stored
    assert command_line("--forget-chat", wp.CUSTOMER_PN)[0] == 0
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*") if p.is_file())
    assert b"987.654.321-00" not in on_disk
    assert wp.CUSTOMER_PN.split("@")[0].encode() not in on_disk
