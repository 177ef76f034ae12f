"""Fault injection: every customer message gets exactly one answer, in order, whatever breaks.

Each test scripts one fault into the fake LLM, the fake WAHA, the gunicorn processes or
the state file, then checks what WAHA saw (status codes), what the customer got (the
fake WAHA's delivered texts) and that /stats adds up. The last section sends what an
attacker would (hostile HTTP) and checks that the server still answers as documented.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest

from fakes import FakeWaha
from fakes import hostile_http as hostile
from fakes import waha_payloads as wp
from fakes.gunicorn_server import GunicornServer
from tests.e2e.conftest import WAHA_KEY
from tests.e2e.test_gunicorn import WEBHOOK, deliver, stats, stats_on_every_worker, wait_for

pytestmark = pytest.mark.e2e

# Short leases and timeouts so recovery happens in seconds, not minutes.
FAULT_ENV = {"LEASE_SECONDS": "2", "WEBHOOK_SYNC_WAIT_SECONDS": "8", "WAHA_TIMEOUT_SECONDS": "1",
             "WAHA_SEND_ATTEMPTS": "2", "LLM_TIMEOUT_SECONDS": "1", "LLM_DEADLINE_SECONDS": "6",
             "REPLY_RETRY_SECONDS": "1", "REPLY_MAX_ATTEMPTS": "3", "GUNICORN_GRACEFUL_TIMEOUT": "12"}
FALLBACK = "Desculpe, tivemos um problema. Tente de novo mais tarde."


@pytest.fixture(scope="module")
def fault_server(start_server: Any) -> GunicornServer:
    return start_server(**FAULT_ENV, FALLBACK_MESSAGE=FALLBACK)


def assert_stats_add_up(server: GunicornServer) -> dict:
    counts = stats(server)
    assert counts["messages_received"] == (counts["messages_processed"] + counts["messages_failed"]
                                           + counts["messages_skipped"] + counts["messages_in_progress"]), counts
    return counts


def customer_texts(fake_waha: FakeWaha, chat: str) -> list[str]:
    return [t["text"] for t in fake_waha.delivered_texts() if t["chatId"] == chat]


# --- the LLM misbehaves ----------------------------------------------------------------------------

@pytest.mark.parametrize("fault, expected", [
    ({"status": 429, "headers": {"Retry-After": "1"}}, "Echo: {text}"),
    ({"status": 500}, "Echo: {text}"),
    ({"status": 502}, "Echo: {text}"),
    ({"delay_s": 2.0}, "Echo: {text}"),                      # one attempt times out, the retry answers
    ({"kind": "error_200"}, "Echo: {text}"),
    ({"kind": "finish_error"}, "Echo: {text}"),
    ({"kind": "empty_content", "times": 2}, FALLBACK),       # empty twice: one quick retry, then give up
    ({"kind": "hang", "times": 0}, FALLBACK),                # hangs on every attempt until the deadline
    ({"status": 401, "times": 0}, FALLBACK),                 # never retried
], ids=["429-retry-after", "500", "502", "timeout", "200-with-error", "finish-error", "empty-content", "hang",
        "401"])
def test_llm_faults_end_in_one_reply(fault_server, fake_waha, fake_llm, fault: dict, expected: str) -> None:
    envelope = wp.text_message("NOWEB", body=f"Pergunta {random.randint(0, 10**9)}")
    fake_llm.add_fault("/chat/completions", **{"times": 1, **fault})
    response = deliver(fault_server, envelope)
    chat = envelope["payload"]["from"]
    assert response.status_code == 200, response.text
    assert response.json()["result"]["status"] == ("fallback" if expected == FALLBACK else "success")
    assert customer_texts(fake_waha, chat) == [expected.format(text=envelope["payload"]["body"])]
    assert_stats_add_up(fault_server)


# --- WAHA misbehaves -------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    {"status": 422, "times": 2},   # session not WORKING yet
    {"status": 500, "times": 1},   # not retried blindly: WAHA is asked first whether the text went out
    {"kind": "hang", "times": 1},  # no answer, nothing sent: the check finds nothing, WAHA redelivers
], ids=["422-session-not-ready", "500", "hang"])
def test_waha_send_failures_get_503_and_the_redelivery_sends_once(fault_server, fake_waha, fake_llm, fault) -> None:
    envelope = wp.text_message("GOWS", body="Qual o prazo de entrega?")
    fake_waha.add_fault("/api/sendText", **fault)
    first = deliver(fault_server, envelope)
    assert first.status_code == 503 and "redeliver" in first.json()["error"]
    second = deliver(fault_server, envelope)  # WAHA's retry of the same body
    assert second.status_code == 200 and second.json()["status"] == "processed"
    chat = envelope["payload"]["from"]
    assert customer_texts(fake_waha, chat) == ["Echo: Qual o prazo de entrega?"]
    assert len(fake_llm.completions()) == 1  # the retry resent the stored reply
    assert_stats_add_up(fault_server)


def test_waha_sent_it_but_the_answer_was_lost_so_no_second_copy(fault_server, fake_waha) -> None:
    envelope = wp.text_message("WEBJS", body="Vocês aceitam Pix?")
    fake_waha.add_fault("/api/sendText", kind="process_then_hang", delay_s=5)
    response = deliver(fault_server, envelope)
    assert response.status_code == 200 and response.json()["status"] == "processed"
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == ["Echo: Vocês aceitam Pix?"]
    assert "decision=already_sent" in fault_server.log_text()


def test_waha_down_then_back_is_retried_by_the_server_itself(start_server, tmp_path) -> None:
    waha = FakeWaha(api_key=WAHA_KEY).start()
    port = waha.port
    waha.stop()  # connection refused from now on
    server = start_server(**{**FAULT_ENV, "WAHA_BASE_URL": f"http://127.0.0.1:{port}", "WEBHOOK_SYNC_WAIT_SECONDS": "3"})
    envelope = wp.text_message("NOWEB", body="Alô?")
    response = deliver(server, envelope)
    assert response.status_code == 503  # WAHA would redeliver; here it does not, to prove our own retry
    revived = FakeWaha(api_key=WAHA_KEY, port=port).start()
    try:
        wait_for(lambda: revived.delivered_texts(), timeout=15)
        time.sleep(1.5)  # a second copy would show up by now
        assert [t["text"] for t in revived.delivered_texts()] == ["Echo: Alô?"]
        assert_stats_add_up(server)
    finally:
        revived.stop()


def test_a_reply_that_keeps_failing_is_given_up_after_bounded_attempts(fault_server, fake_waha) -> None:
    envelope = wp.text_message("GOWS", body="Teste de falha")
    fake_waha.add_fault("/api/sendText", status=500, times=0)
    before = stats(fault_server)
    assert deliver(fault_server, envelope).status_code == 503
    wait_for(lambda: stats(fault_server)["messages_undelivered"] > before["messages_undelivered"], timeout=20)
    counts = assert_stats_add_up(fault_server)
    assert counts["messages_failed"] == before["messages_failed"] + 1
    assert "then=failed" in fault_server.log_text()
    fake_waha.clear_faults()
    again = deliver(fault_server, envelope)
    assert again.json() == {"status": "ignored", "reason": "duplicate", "detail": "message already given up on"}
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == []


# --- processes die ---------------------------------------------------------------------------------

def test_kill_9_of_the_worker_thinking_about_a_reply(fault_server, fake_waha, fake_llm) -> None:
    envelope = wp.text_message("WEBJS", body="Meu pedido não chegou")
    fake_llm.add_fault("/chat/completions", delay_s=3)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(first=_try_deliver(fault_server, envelope)))
    thread.start()
    os.kill(fault_server.pid_working_on(envelope["id"]), signal.SIGKILL)
    thread.join()
    if not isinstance(outcome["first"], httpx.Response) or outcome["first"].status_code != 200:
        redelivery = deliver(fault_server, envelope)  # WAHA retries anything that was not a 2xx
        assert redelivery.status_code in (200, 202), redelivery.text
    chat = envelope["payload"]["from"]
    wait_for(lambda: customer_texts(fake_waha, chat), timeout=20)
    time.sleep(1.5)
    assert customer_texts(fake_waha, chat) == ["Echo: Meu pedido não chegou"]
    assert_stats_add_up(fault_server)


def test_kill_9_of_the_worker_while_waha_is_sending(start_server, fake_waha) -> None:
    server = start_server(**{**FAULT_ENV, "WAHA_TIMEOUT_SECONDS": "30"})
    envelope = wp.text_message("NOWEB", body="Cancelar assinatura")
    fake_waha.add_fault("/api/sendText", kind="process_then_hang", delay_s=30)
    thread = threading.Thread(target=_try_deliver, args=(server, envelope))
    thread.start()
    chat = envelope["payload"]["from"]
    wait_for(lambda: customer_texts(fake_waha, chat))  # the text reached WhatsApp...
    os.kill(server.pid_working_on(envelope["id"]), signal.SIGKILL)  # ...and the worker died before the answer
    thread.join()
    wait_for(lambda: "decision=already_sent" in server.log_text(), timeout=20)
    assert customer_texts(fake_waha, chat) == ["Echo: Cancelar assinatura"]
    assert_stats_add_up(server)


def test_sigterm_mid_reply_hands_it_back_and_the_next_start_finishes_it(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**FAULT_ENV, "WEBHOOK_SYNC_WAIT_SECONDS": "0.5", "LLM_TIMEOUT_SECONDS": "60",
                             "LLM_DEADLINE_SECONDS": "120"})
    envelope = wp.text_message("GOWS", body="Preciso falar com alguém")
    fake_llm.add_fault("/chat/completions", delay_s=30, times=0)  # the LLM is stuck past the graceful drain
    assert deliver(server, envelope).status_code == 202
    server.pid_working_on(envelope["id"])
    assert server.stop() == 0
    assert "handed back to the inbox" in server.log_text()
    chat = envelope["payload"]["from"]
    assert customer_texts(fake_waha, chat) == []
    fake_llm.clear_faults()
    server.start()  # same state file
    wait_for(lambda: customer_texts(fake_waha, chat), timeout=15)
    time.sleep(1.5)
    assert customer_texts(fake_waha, chat) == ["Echo: Preciso falar com alguém"]
    assert_stats_add_up(server)


def test_kill_9_of_the_whole_server_mid_reply_and_restart(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**FAULT_ENV, "WEBHOOK_SYNC_WAIT_SECONDS": "0.5", "LEASE_SECONDS": "600"})
    envelope = wp.text_message("NOWEB", body="Queda de energia")
    fake_llm.add_fault("/chat/completions", delay_s=30, times=0)
    assert deliver(server, envelope).status_code == 202
    server.pid_working_on(envelope["id"])
    os.killpg(server.process.pid, signal.SIGKILL)  # master and workers at once, like a power cut
    server.process.wait()
    fake_llm.clear_faults()
    server.start()  # the lease (600 s) has not run out: start-up recovery must take the message over
    chat = envelope["payload"]["from"]
    wait_for(lambda: customer_texts(fake_waha, chat), timeout=15)
    time.sleep(1.5)
    assert customer_texts(fake_waha, chat) == ["Echo: Queda de energia"]
    assert "recovering 1 messages left unfinished" in server.log_text()
    assert_stats_add_up(server)


def test_sigterm_lets_an_almost_finished_reply_go_out_first(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**FAULT_ENV, "WEBHOOK_SYNC_WAIT_SECONDS": "0.2"})
    envelope = wp.text_message("WEBJS", body="Até que horas?")
    fake_llm.add_fault("/chat/completions", delay_s=0.8)
    assert deliver(server, envelope).status_code == 202
    server.pid_working_on(envelope["id"])
    assert server.stop() == 0
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == ["Echo: Até que horas?"]


# --- the store fails -------------------------------------------------------------------------------

def test_an_unwritable_state_file_gets_503_so_waha_keeps_the_message(start_server, fake_waha) -> None:
    server = start_server(**FAULT_ENV)
    assert deliver(server, wp.message_ack("WEBJS")).status_code == 200  # workers have open connections now
    state_files = [p for p in (server.state_db, server.state_db + "-wal") if os.path.exists(p)]
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *state_files],
                                                        capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs e2fsprogs and root or CAP_LINUX_IMMUTABLE)")
    envelope = wp.text_message("NOWEB", body="Tem estoque?")
    try:
        for _ in range(3):  # whichever worker answers
            response = deliver(server, envelope)
            assert response.status_code == 503 and "not recorded" in response.json()["error"]
        assert httpx.get(server.url + "/health").status_code in (200, 503)
    finally:
        subprocess.run(["chattr", "-i", *state_files], check=True)
    # Like WAHA, redeliver until a 2xx: a worker thread may fail once more while SQLite reopens the file.
    for _ in range(10):
        response = deliver(server, envelope)
        if response.status_code != 503:
            break
        time.sleep(0.2)
    assert response.status_code == 200 and response.json()["status"] == "processed"
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == ["Echo: Tem estoque?"]


# --- load ------------------------------------------------------------------------------------------

def test_burst_of_200_deliveries_answers_50_messages_once_each_in_chat_order(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**FAULT_ENV)
    fake_llm.latency_s = 0.5  # an LLM is never instant; order must hold while replies overlap
    chats = [f"55119{n:08d}@c.us" for n in range(10, 20)]
    base = int(time.time())
    deliveries = []
    for chat in chats:
        for turn in range(5):
            bare = f"3EB0{random.getrandbits(72):018X}"
            body = f"{chat[:13]} mensagem {turn}"
            for copy in range(4):
                event = "message.any" if copy == 3 else "message"
                envelope = wp.text_message("NOWEB", sender=chat, body=body, message_id=bare, event=event,
                                           timestamp=base + turn)
                deliveries.append(envelope)
    random.shuffle(deliveries)
    try:
        # WAHA fires deliveries without waiting for each other: model that with one thread each.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(deliveries)) as pool:
            responses = list(pool.map(lambda envelope: deliver(server, envelope), deliveries))
        assert all(r.status_code in (200, 202) for r in responses), {r.status_code for r in responses}
        assert sum(r.json()["status"] == "ignored" for r in responses) >= 150
        wait_for(lambda: len(fake_waha.delivered_texts()) >= 50, timeout=60)
        time.sleep(1)
    finally:
        fake_llm.latency_s = 0.0
    for chat in chats:
        assert customer_texts(fake_waha, chat) == [f"Echo: {chat[:13]} mensagem {turn}" for turn in range(5)]
    assert len(fake_waha.delivered_texts()) == 50
    counts = assert_stats_add_up(server)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_in_progress"]) == (50, 50, 0)
    assert "database is locked" not in server.log_text()


def _try_deliver(server: GunicornServer, envelope: dict) -> httpx.Response | Exception:
    try:
        return deliver(server, envelope)
    except httpx.HTTPError as exc:  # the worker holding the connection was killed
        return exc


def test_sigterm_releases_webhooks_waiting_for_replies_at_once(start_server, fake_waha, fake_llm) -> None:
    server = start_server(**{**FAULT_ENV, "WEBHOOK_SYNC_WAIT_SECONDS": "20", "LLM_TIMEOUT_SECONDS": "60",
                             "LLM_DEADLINE_SECONDS": "120"})
    envelope = wp.text_message("WEBJS", body="Resposta demorada")
    fake_llm.add_fault("/chat/completions", delay_s=30, times=0)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(response=_try_deliver(server, envelope)))
    thread.start()
    server.pid_working_on(envelope["id"])
    stopped_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    thread.join()
    assert outcome["response"].status_code == 202  # recorded; WAHA need not redeliver
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - stopped_at < 10  # not the 20 s sync wait plus the drain
    assert "handed back to the inbox" in server.log_text()
    fake_llm.clear_faults()
    server.start()
    wait_for(lambda: customer_texts(fake_waha, envelope["payload"]["from"]), timeout=15)
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == ["Echo: Resposta demorada"]


# --- hostile HTTP ----------------------------------------------------------------------------------

HMAC_KEY = "e2e-hostile-hmac"
TOKEN = "e2e-hostile-token"
MAX_BODY = 1024 * 1024  # the default MAX_BODY_BYTES
# Latencies under attack are printed (pytest -s), never asserted: the machine is shared; client timeouts
# are generous instead.


def test_150_slow_clients_do_not_stop_valid_webhooks_or_health(start_server, fake_waha) -> None:
    server = start_server(WEBHOOK_HMAC_KEY=HMAC_KEY, REQUEST_READ_TIMEOUT_SECONDS="2")
    attack = hostile.SlowClients(server.url, count=150, interval=1.0, seconds=90).start()
    answered: list[tuple[str, int, float]] = []
    try:
        time.sleep(1)  # every slow client is connected and holding on
        began = time.monotonic()
        while time.monotonic() - began < 10 and len(answered) < 200:  # ~10 s of the attack, bounded
            envelope = wp.text_message("WEBJS", body=f"Sob ataque {len(answered)}")
            started = time.monotonic()
            response = deliver(server, envelope, hmac_key=HMAC_KEY)
            answered.append(("webhook", response.status_code, time.monotonic() - started))
            assert response.status_code == 200 and response.json()["status"] == "processed", response.text
            status, took = hostile.probe(server.url, "/health", timeout=30)
            answered.append(("health", status, took))
            assert status == 200
            time.sleep(0.2)
    finally:
        closed = attack.stop()
    for kind in ("webhook", "health"):
        took = sorted(t for k, _, t in answered if k == kind)
        print(f"\n{len(took)} {kind} answers under attack, seconds: median {took[len(took) // 2]:.3f}, "
              f"max {took[-1]:.3f}; all: {' '.join(f'{t:.3f}' for t in took)}")
    print(f"the server closed {closed} slow connections of {attack.connections} opened")
    assert len(answered) >= 4
    assert closed >= 150  # every slow client was cut off at least once, none was waited for
    assert len(fake_waha.delivered_texts()) == len(answered) // 2
    assert "had not sent a whole request within REQUEST_READ_TIMEOUT_SECONDS=2s" in server.log_text()
    assert "Traceback" not in server.tail(200)


def test_clients_that_stay_silent_after_their_answer_do_not_stall_the_workers(server) -> None:
    # Each connection is answered and closed by the server; the client then neither reads nor hangs up.
    # gthread's graceful close waited up to 2 s for it in the worker's main thread, one connection after another.
    sockets = hostile.silent_after_answer(server.url, 200)
    try:
        answers = [hostile.probe(server.url, "/health", timeout=20) for _ in range(5)]
    finally:
        for sock in sockets:
            sock.close()
    print(f"\n/health with 200 silent clients, seconds: {' '.join(f'{took:.3f}' for _, took in answers)}")
    assert [status for status, _ in answers] == [200] * 5


def test_an_oversized_declared_body_gets_413_at_once_without_being_read(start_server) -> None:
    server = start_server(WEBHOOK_HMAC_KEY=HMAC_KEY)
    # 4 MB announced, one byte sent: the body is refused without waiting for (or reading) the rest.
    answer = hostile.exchange(server.url, hostile.post_head(length=4_000_000) + b"{", timeout=15)
    assert hostile.status_of(answer) == 413, answer[:300]
    assert b"Connection: close" in answer and b"larger than 1048576 bytes" in answer
    assert deliver(server, wp.text_message("GOWS"), hmac_key=HMAC_KEY).json()["status"] == "processed"


def test_an_unsigned_flood_is_counted_in_batches_and_logged_in_summaries(start_server) -> None:
    server = start_server(WEBHOOK_HMAC_KEY=HMAC_KEY)
    sent = 3000

    def flood(share: int) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            return [http.post(WEBHOOK, content=b'{"event":"message"}',
                              headers={"Content-Type": "application/json"}).status_code for _ in range(share)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [s for shares in pool.map(flood, [sent // 8] * 8) for s in shares]
    assert statuses == [401] * sent
    for counts in stats_on_every_worker(server, lambda s: s["requests_unauthorized"] == sent):
        assert counts["requests_unauthorized"] == sent
    lines = [line for line in server.log_text().splitlines() if "rejected status=401" in line]
    print(f"\n{len(lines)} log lines for {sent} rejections while the flood lasted")
    assert len(lines) <= 4  # the first rejection of each worker, at most one summary each
    assert server.stop() == 0
    # At exit each worker sums up what it did not log one by one.
    log = server.log_text()
    firsts = log.count("rejected status=401 reason=")
    summed = sum(int(n) for n in re.findall(r"requests rejected status=401: (\d+) more since", log))
    assert firsts + summed == sent, (firsts, summed)


@pytest.mark.parametrize("auth", ["token", "hmac"])
def test_a_chunked_body_over_the_limit_is_413_not_cut_and_processed(start_server, fake_waha, auth: str) -> None:
    server = start_server(**({"WEBHOOK_SECRET_TOKEN": TOKEN} if auth == "token" else {"WEBHOOK_HMAC_KEY": HMAC_KEY}))
    # Its first MAX_BODY_BYTES are a valid message: cut there, it used to be answered (token) or 401 (HMAC).
    message = wp.dumps(wp.text_message("WEBJS", body="Só o começo"))
    body = message + b" " * (MAX_BODY - len(message)) + b"x" * (3 * MAX_BODY)
    headers = {"Content-Type": "application/json", "X-Webhook-Token": TOKEN, "X-Webhook-Hmac": wp.sign(body, HMAC_KEY),
               "X-Webhook-Hmac-Algorithm": "sha512"}
    response = httpx.post(server.url + WEBHOOK, content=hostile.chunked(body), headers=headers, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "request body is larger than 1048576 bytes"}
    assert fake_waha.delivered_texts() == []
    assert stats(server)["messages_received"] == 0
    assert "request rejected status=413 (body over MAX_BODY_BYTES=1048576)" in server.log_text()
    small = wp.text_message("WEBJS", body="Inteiro")
    response = httpx.post(server.url + WEBHOOK, content=hostile.chunked(wp.dumps(small), size=100),
                          headers={**headers, "X-Webhook-Hmac": wp.sign(wp.dumps(small), HMAC_KEY)}, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "processed"  # chunked within the limit


def test_malformed_chunked_encoding_is_a_400_json_error_logged_in_one_line(start_server) -> None:
    server = start_server()  # its own log: after the first 400 of a worker, the others are summed up
    for name, chunks in hostile.BAD_CHUNKS.items():
        answer = hostile.exchange(server.url, hostile.post_head(chunked=True) + chunks)
        assert hostile.status_of(answer) == 400, (name, answer[:300])
        assert b'{"error":"malformed chunked request body: ' in answer, (name, answer)
    log = server.log_text()
    assert re.search(r'rejected status=400 error="?malformed chunked request body: Invalid chunk', log), log[-2000:]
    assert "Traceback" not in log and "Traceback" not in server.tail(200)
    assert deliver(server, wp.text_message("NOWEB")).json()["status"] == "processed"


@pytest.mark.parametrize("framing", ["small", "large", "chunked"])
def test_a_body_cut_short_by_the_client_leaving_is_not_processed(server, fake_waha, framing: str) -> None:
    message = wp.dumps(wp.text_message("WEBJS", body=f"Pela metade ({framing})"))
    if framing == "chunked":  # one whole chunk with a valid message, then the connection ends mid-chunk
        data = hostile.post_head(chunked=True) + b"%x\r\n" % len(message) + message + b"\r\n400\r\n{"
    else:  # a valid message, announced as longer than it is (large: past what the poller gathers)
        padded = message + b" " * (0 if framing == "small" else 200_000)
        data = hostile.post_head(length=len(padded) + 100) + padded
    before = stats(server)
    hostile.exchange(server.url, data, half_close=True)
    time.sleep(1)  # a reply, if one were wrongly started, would have reached the fake WAHA by now
    assert fake_waha.delivered_texts() == []
    assert stats(server)["messages_received"] == before["messages_received"]
    assert deliver(server, wp.text_message("WEBJS")).json()["status"] == "processed"
