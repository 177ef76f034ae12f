"""End to end: WAHA-shaped deliveries to gunicorn (2 workers) -> fake OpenRouter -> fake WAHA, all on loopback."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fakes import waha_payloads as wp
from fakes.gunicorn_server import REPO, GunicornServer, free_port

pytestmark = pytest.mark.e2e
WEBHOOK = "/api/v1/whatsapp/webhook"


# One pooled client, like WAHA's sender: building an httpx client per call costs ~25 ms of CPU,
# which would make a burst arrive over seconds instead of at once. Keep-alive room equals the pool:
# with more connections than keep-alive slots, httpcore's pool closes "surplus" idle connections,
# and under 200 threads it can close one just handed to another thread's request (EBADF, seen in CI).
SENDER = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=500, max_keepalive_connections=500))


def deliver(server: GunicornServer, envelope: dict | bytes, *, headers: dict | None = None,
            hmac_key: str | None = None) -> httpx.Response:
    """One WAHA delivery: compact JSON bytes, signed when a key is given."""
    body = envelope if isinstance(envelope, bytes) else wp.dumps(envelope)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if hmac_key:
        all_headers.update({"X-Webhook-Hmac": wp.sign(body, hmac_key), "X-Webhook-Hmac-Algorithm": "sha512"})
    return SENDER.post(server.url + WEBHOOK, content=body, headers=all_headers)


def stats(server: GunicornServer) -> dict:
    return httpx.get(server.url + "/stats", timeout=5).json()["stats"]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_text_message_is_answered_once_in_the_same_chat_and_session(server, fake_waha, fake_llm, engine) -> None:
    envelope = wp.text_message(engine, body="Vocês entregam em Campinas?", sender=wp.CUSTOMER_LID, session="default")
    response = deliver(server, envelope)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["status"] == "success" and result["from_number"] == wp.CUSTOMER_LID
    assert result["message_id"].startswith(f"true_{wp.CUSTOMER_LID}_")  # the fake WAHA runs the WEBJS engine
    assert fake_waha.sent_texts() == [{"session": "default", "chatId": wp.CUSTOMER_LID,
                                       "text": "Echo: Vocês entregam em Campinas?", "reply_to": None}]
    assert len(fake_llm.completions()) == 1


def test_twenty_copies_at_once_on_both_workers_get_one_reply(server, fake_waha, fake_llm) -> None:
    fake_llm.add_fault("/chat/completions", delay_s=0.5)  # keep the first copy busy while the others land
    by_lid, by_phone = wp.lid_and_pn_pair("NOWEB")
    bare_id = by_lid["payload"]["id"].split("_")[2]
    any_copy = wp.text_message("NOWEB", event="message.any", sender=wp.CUSTOMER_LID, message_id=bare_id)
    copies = [by_lid, by_phone, any_copy, by_lid] * 5
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda envelope: deliver(server, envelope), copies))
    statuses = sorted(r.json()["status"] for r in responses)
    assert all(r.status_code == 200 for r in responses)
    assert statuses == ["ignored"] * 19 + ["processed"]
    assert len(fake_waha.sent_texts()) == 1 and len(fake_llm.completions()) == 1


def stats_on_every_worker(server: GunicornServer, settled=lambda counts: True, attempts: int = 200) -> list[dict]:
    """/stats from both workers (new connections until each has answered), taken once `settled` holds there.

    A worker writes its counts of ignored and rejected requests about once a second, so another worker's
    /stats may lag that long behind the requests.
    """
    by_worker: dict[int, dict] = {}
    for _ in range(attempts):
        document = httpx.get(server.url + "/stats", timeout=5).json()
        if settled(document["stats"]):
            by_worker[document["worker_pid"]] = document["stats"]
        if len(by_worker) == 2:
            return list(by_worker.values())
        time.sleep(0.05)
    raise AssertionError(f"only these workers answered (settled): {by_worker}")


def test_stats_are_the_same_whichever_worker_answers(start_server) -> None:
    server = start_server()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda _: deliver(server, wp.message_ack("GOWS")), range(100)))
    first, second = stats_on_every_worker(server, lambda counts: counts["messages_ignored"] >= 100)
    assert first["ignored_by_reason"] == second["ignored_by_reason"] == {"event_not_handled": 100}
    assert first["server_started_at"] == second["server_started_at"]


def test_llm_failure_sends_the_fallback_and_counts_a_failure(start_server, fake_waha, fake_llm) -> None:
    server = start_server(FALLBACK_MESSAGE="Estamos com instabilidade, já voltamos.")
    fake_llm.add_fault("/chat/completions", status=401, times=0)
    response = deliver(server, wp.text_message("GOWS"))
    assert response.status_code == 200 and response.json()["result"]["status"] == "fallback"
    assert [t["text"] for t in fake_waha.sent_texts()] == ["Estamos com instabilidade, já voltamos."]
    counts = stats(server)
    assert (counts["messages_received"], counts["messages_processed"], counts["messages_failed"]) == (1, 0, 1)


def test_send_failure_gets_503_and_wahas_redelivery_sends_the_reply_once(server, fake_waha, fake_llm) -> None:
    fake_waha.add_fault("/api/sendText", status=500, times=1)
    envelope = wp.text_message("WEBJS", body="Quero cancelar meu pedido")
    first = deliver(server, envelope)
    assert first.status_code == 503 and "redeliver" in first.json()["error"]
    assert fake_waha.sent_texts() == []
    second = deliver(server, envelope)  # WAHA retries non-2xx with the same body
    assert second.status_code == 200 and second.json()["status"] == "processed"
    assert [t["text"] for t in fake_waha.sent_texts()] == ["Echo: Quero cancelar meu pedido"]
    assert len(fake_llm.completions()) == 1
    assert deliver(server, envelope).json()["reason"] == "duplicate"


def test_slow_llm_gets_202_and_the_reply_still_arrives(start_server, fake_waha, fake_llm) -> None:
    server = start_server(WEBHOOK_SYNC_WAIT_SECONDS="0.5")
    fake_llm.add_fault("/chat/completions", delay_s=2.0)
    response = deliver(server, wp.text_message("NOWEB", body="Oi"))
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    wait_for(lambda: fake_waha.sent_texts())
    assert fake_waha.sent_texts()[0]["text"] == "Echo: Oi"


def test_typing_simulation_calls_presence_then_sends(start_server, fake_waha) -> None:
    server = start_server(TYPING_SIMULATION="true")
    envelope = wp.text_message("WEBJS", body="Bom dia")
    assert deliver(server, envelope).status_code == 200
    chat = envelope["payload"]["from"]
    assert [path for path, _ in fake_waha.presence_calls(chat)] == ["/api/sendSeen", "/api/startTyping",
                                                                     "/api/stopTyping"]
    assert [r["path"] for r in fake_waha.requests(method="POST")][-1] == "/api/sendText"


def test_bad_input_gets_json_errors_and_the_server_keeps_serving(server, fake_waha) -> None:
    cases = [(b"{not json", 400), (b"[1,2,3]", 400), (b"", 400), (b"\xff\xfe", 400), (b"{}" + b" " * 2_000_000, 413)]
    for body, status in cases:
        response = deliver(server, body)
        assert response.status_code == status and "error" in response.json(), body[:20]
    response = httpx.post(server.url + WEBHOOK, content=b'{"event":"message"}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "error" in response.json()
    assert deliver(server, wp.text_message("WEBJS")).json()["status"] == "processed"


def test_hmac_protected_server_rejects_unsigned_and_answers_signed(start_server, fake_waha) -> None:
    server = start_server(WEBHOOK_HMAC_KEY="e2e-hmac-key", WEBHOOK_SECRET_TOKEN="e2e-token")
    envelope = wp.text_message("GOWS")
    token = {"X-Webhook-Token": "e2e-token"}
    assert deliver(server, envelope, headers=token).status_code == 401
    assert deliver(server, envelope, hmac_key="e2e-hmac-key").status_code == 401
    assert fake_waha.sent_texts() == []
    response = deliver(server, envelope, headers=token, hmac_key="e2e-hmac-key")
    assert response.status_code == 200 and len(fake_waha.sent_texts()) == 1
    assert "e2e-hmac-key" not in server.log_text() and "e2e-token" not in server.log_text()


def test_live_suite_passes_against_a_running_server(server, tmp_path) -> None:
    # Run from an empty folder: the live suite reads ./.env.webhook, and a developer's must not count here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_")}
    result = subprocess.run([sys.executable, str(REPO / "test_webhook_server.py"), server.url], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_missing_settings_stop_start_up_with_one_clear_message(start_server) -> None:
    server = start_server(wait=False, WAHA_API_KEY="", OPENROUTER_BASE_URL="https://openrouter.ai/api/v1",
                          OPENROUTER_API_KEY="")
    assert server.process.wait(timeout=30) != 0
    output = server.tail()
    assert "OPENROUTER_API_KEY is not set" in output and "WAHA_API_KEY is not set" in output
    assert "Traceback" not in output


def test_sigterm_stops_the_server_cleanly(start_server) -> None:
    server = start_server()
    assert server.stop() == 0


def scrape(server: GunicornServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(server.url + "/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_add_up_across_workers_and_survive_a_dead_worker(start_server, fake_llm) -> None:
    server = start_server()
    fake_llm.add_fault("/chat/completions", status=401, times=1)
    results = [deliver(server, wp.text_message(engine, body=f"pergunta {engine}")) for engine in wp.ENGINES]
    assert sorted(r.json()["result"]["status"] for r in results) == ["fallback", "success", "success"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: deliver(server, wp.message_ack("WEBJS")), range(20)))
    deliver(server, b"{broken")

    def check(samples: dict) -> None:
        assert samples[("webhook_messages_received_total", ())] == 3
        assert samples[("webhook_messages_processed_total", ())] == 2
        assert samples[("webhook_messages_failed_total", (("reason", "llm"),))] == 1
        assert samples[("webhook_processing_duration_seconds_count", ())] == 3
        assert samples[("webhook_messages_ignored_total", (("reason", "event_not_handled"),))] == 20
        assert samples[("webhook_requests_rejected_total", (("status", "400"),))] == 1
        assert samples[("webhook_llm_errors_total", (("status", "401"),))] == 1
        assert samples[("webhook_llm_tokens_total", (("kind", "prompt"),))] > 0
        assert samples[("webhook_replies_in_flight", ())] == 0
        # Read from the shared store at scrape time: one series each, not one per worker added up.
        assert {labels: value for (name, labels), value in samples.items() if name == "webhook_inbox_messages"} == {
            (("status", status),): 0 for status in ("queued", "processing", "sending", "merged")}
        assert samples[("webhook_health_check_status", (("check", "store"),))] == 0

    for _ in range(10):  # whichever worker answers the scrape
        check(scrape(server))
        assert httpx.get(server.url + "/metrics", timeout=5).text.count('webhook_inbox_messages{status="queued"}') == 1
    worker = httpx.get(server.url + "/stats", timeout=5).json()["worker_pid"]
    os.kill(worker, signal.SIGKILL)  # its counter files stay; the master marks its live gauge dead
    time.sleep(1)
    check(scrape(server))


def test_check_command_against_the_fakes(tmp_path, fake_waha, fake_llm) -> None:
    from tests.e2e.conftest import upstream_env

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "empty.env").write_text("")
        variables = {"PATH": os.environ["PATH"], "WEBHOOK_ENV_FILE": str(tmp_path / "empty.env"),
                     "STATE_DB": str(tmp_path / "state.db"), "LOG_FILE": "",
                     **upstream_env(fake_waha, fake_llm), **env}
        return subprocess.run([sys.executable, str(REPO / "whatsapp_webhook_server.py"), "--check"], cwd=tmp_path,
                              env=variables, capture_output=True, text=True, timeout=60)

    healthy = run()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "OK   WAHA session WORKING: default=WORKING" in healthy.stdout
    assert "OK   LLM model OPENROUTER_MODEL: google/gemini-3.1-flash-lite is served (input: text, image, audio, " \
           "file, video)" in healthy.stdout
    assert "OK   LLM model OPENROUTER_FALLBACK_MODELS: google/gemini-3.5-flash is served" in healthy.stdout
    wrong = run(WAHA_API_KEY="not-the-key", OPENROUTER_MODEL="google/gemini-2.0-flash-001")
    assert wrong.returncode == 1
    assert "FAIL WAHA API key and sessions: GET /api/sessions: HTTP 401" in wrong.stdout
    assert "FAIL LLM model OPENROUTER_MODEL: google/gemini-2.0-flash-001 is not among the 2 models" in wrong.stdout
    assert "fix: set OPENROUTER_MODEL to a listed id, e.g. google/gemini-3.5-flash or google/gemini-3.1-flash-lite" \
           in wrong.stdout
    assert "not-the-key" not in wrong.stdout
    unreachable = run(OPENROUTER_BASE_URL=f"http://127.0.0.1:{free_port()}/api/v1", OPENROUTER_API_KEY="wrong-key")
    assert "FAIL LLM reachable: cannot reach http://127.0.0.1:" in unreachable.stdout
    rejected = run(OPENROUTER_API_KEY="wrong-key")
    assert "FAIL LLM key:" in rejected.stdout and "rejected the key (HTTP 401)" in rejected.stdout
    assert "wrong-key" not in rejected.stdout + unreachable.stdout


def test_a_retired_configured_model_still_gets_customers_the_fallback_models_reply(
        start_server, fake_waha, fake_llm) -> None:
    """The default of release 1.0 (google/gemini-2.0-flash-001) no longer exists: the fake answers it 404."""
    server = start_server(OPENROUTER_MODEL="google/gemini-2.0-flash-001",
                          OPENROUTER_FALLBACK_MODELS="google/gemini-3.5-flash")
    healthy = httpx.get(server.url + "/health", timeout=5).json()
    assert healthy["status"] == "healthy" and healthy["service"] == "whatsapp_webhook_server"
    envelopes = [wp.text_message(engine, body=f"Vocês abrem no sábado? ({engine})") for engine in wp.ENGINES]
    for envelope in envelopes:
        response = deliver(server, envelope)
        assert response.status_code == 200 and response.json()["status"] == "processed", response.text
    assert sorted(sent["text"] for sent in fake_waha.sent_texts()) == sorted(
        f"Echo: {envelope['payload']['body']}" for envelope in envelopes)
    models = [body["model"] for body in fake_llm.completions()]
    assert models.count("google/gemini-3.5-flash") == 3  # every customer was answered by the fallback
    assert models.count("google/gemini-2.0-flash-001") <= 2  # each worker learns once, then skips the retired id
    # Both workers answer /health from the shared store, so whichever answers says the same.
    documents = [httpx.get(server.url + "/health", timeout=5).json() for _ in range(6)]
    assert {d["status"] for d in documents} == {"degraded"}
    assert {d["checks"]["llm"]["status"] for d in documents} == {"degraded"}
    assert "OPENROUTER_MODEL=google/gemini-2.0-flash-001 is not served" in documents[0]["checks"]["llm"]["reason"]
    log = server.log_text()
    assert "model_unavailable model=google/gemini-2.0-flash-001 setting=OPENROUTER_MODEL" in log
