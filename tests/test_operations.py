"""Operator tools: the deployment check, /metrics in one process, JSON logs and shared log rotation."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from typing import Any

import httpx
import pytest
import respx

from fakes import waha_payloads as wp
from tests.conftest import LLM_BASE, WAHA_BASE, completion, make_settings, post_event
from whatsapp_webhook import EXTENSION_KEY
from whatsapp_webhook.cli import CheckResult, check_deployment
from whatsapp_webhook.logs import SharedRotatingFileHandler
from whatsapp_webhook.store_api import StoreUnavailable


def run_check(tmp_path: Any, routes: dict[str, Any], **overrides: Any) -> list[CheckResult]:
    settings = make_settings(tmp_path, **overrides)
    with respx.mock(using="http11", assert_all_called=False) as router:
        for url, response in routes.items():
            method, url = url.split(" ", 1) if " " in url else ("GET", url)
            router.route(method=method, url=url).mock(side_effect=response if isinstance(response, Exception) else None,
                                 return_value=None if isinstance(response, Exception) else response)
        return check_deployment(settings)


HEALTHY = {
    f"{WAHA_BASE}/ping": httpx.Response(200, json={"message": "pong"}),
    f"{WAHA_BASE}/api/sessions?all=true": httpx.Response(200, json=[{"name": "default", "status": "WORKING"}]),
    f"{LLM_BASE}/models": httpx.Response(200, json={"data": [
        {"id": "google/gemini-3.1-flash-lite", "architecture": {"input_modalities": ["text", "image", "audio"]}},
        {"id": "google/gemini-3.5-flash"}, {"id": "openai/gpt-5-mini"}]}),
    f"POST {LLM_BASE}/chat/completions": httpx.Response(200, json=completion("p")),
}


def test_check_passes_when_waha_and_the_llm_are_ready(tmp_path) -> None:
    results = run_check(tmp_path, HEALTHY)
    assert [r.name for r in results] == ["WAHA reachable", "WAHA session WORKING", "LLM model OPENROUTER_MODEL",
                                         "media", "LLM model OPENROUTER_FALLBACK_MODELS", "LLM answers"]
    assert all(r.ok for r in results)
    assert results[2].detail == "google/gemini-3.1-flash-lite is served (input: text, image, audio)"
    # which customers' files will be understood, from the model's input_modalities (no "file": no PDFs)
    assert results[3].detail == ("google/gemini-3.1-flash-lite understands voice notes and audio, images and stickers;"
                                 " PDFs get MEDIA_UNSUPPORTED_REPLY (video and other documents always do)")


def test_check_names_each_missing_model_and_suggests_ids_from_the_servers_own_list(tmp_path) -> None:
    results = run_check(tmp_path, HEALTHY, openrouter_model="google/gemini-2.0-flash-001",
                        openrouter_fallback_models=("google/gemini-3.5-flash", "openai/gpt-4o-mini"))
    failed = {r.name: r.line() for r in results if not r.ok}
    assert set(failed) == {"LLM model OPENROUTER_MODEL", "LLM model OPENROUTER_FALLBACK_MODELS"}
    primary = failed["LLM model OPENROUTER_MODEL"]
    assert "google/gemini-2.0-flash-001 is not among the 3 models" in primary
    hint = primary.split("fix: set OPENROUTER_MODEL to a listed id, e.g. ")[1]
    assert set(hint.split(" or ")) == {"google/gemini-3.1-flash-lite", "google/gemini-3.5-flash"}
    assert "openai/gpt-4o-mini is not among" in failed["LLM model OPENROUTER_FALLBACK_MODELS"]
    assert "e.g. openai/gpt-5-mini" in failed["LLM model OPENROUTER_FALLBACK_MODELS"]
    # Suggestions come only from what the server lists, never from a hard-coded id.
    bare = run_check(tmp_path, {**HEALTHY, f"{LLM_BASE}/models": httpx.Response(200, json={"data": [{"id": "x/y"}]})})
    assert [r.line() for r in bare if not r.ok][0].endswith("fix: set OPENROUTER_MODEL to a listed id")


@pytest.mark.parametrize("change, failing, hint", [
    ({f"{WAHA_BASE}/ping": httpx.ConnectError("refused")}, "WAHA reachable", "WAHA_BASE_URL"),
    ({f"{WAHA_BASE}/api/sessions?all=true": httpx.Response(401, json={"message": "Unauthorized"})},
     "WAHA API key and sessions", "WAHA_API_KEY must equal"),
    ({f"{WAHA_BASE}/api/sessions?all=true": httpx.Response(200, json=[{"name": "default", "status": "SCAN_QR_CODE"}])},
     "WAHA session WORKING", "scan the QR code"),
    ({f"{LLM_BASE}/models": httpx.ConnectError("refused")}, "LLM reachable", "OPENROUTER_BASE_URL"),
    ({f"{LLM_BASE}/models": httpx.Response(401, json={"error": {"message": "bad key"}})}, "LLM key",
     "OPENROUTER_API_KEY"),
    ({f"{LLM_BASE}/models": httpx.Response(200, text="<html>")}, "LLM reachable", "OPENROUTER_BASE_URL"),
    # Servers other than OpenRouter often list models to anyone: only a real request shows the key is wrong.
    ({f"POST {LLM_BASE}/chat/completions": httpx.Response(401, json={"error": {"message": "bad key"}})}, "LLM key",
     "OPENROUTER_API_KEY"),
])
def test_check_names_what_is_wrong_and_how_to_fix_it(tmp_path, change: dict, failing: str, hint: str) -> None:
    results = run_check(tmp_path, {**HEALTHY, **change})
    failed = [r for r in results if not r.ok]
    assert [r.name for r in failed] == [failing] and hint in failed[0].line()
    assert "test-waha-key" not in failed[0].line() and "test-llm-key" not in failed[0].line()


def test_check_validates_an_openrouter_key(tmp_path) -> None:
    base = "https://openrouter.ai/api/v1"
    routes = {**HEALTHY, f"{base}/models": HEALTHY[f"{LLM_BASE}/models"],
              f"{base}/key": httpx.Response(401, json={"error": {"code": 401, "message": "No auth"}})}
    results = run_check(tmp_path, routes, openrouter_base_url=base)
    assert [r.name for r in results if not r.ok] == ["OpenRouter key"]
    assert "the key was rejected (GET /key answered HTTP 401)" in next(r.line() for r in results if not r.ok)
    unreachable = run_check(tmp_path, {**routes, f"{base}/key": httpx.ConnectError("refused")},
                            openrouter_base_url=base)
    assert next(r.detail for r in unreachable if not r.ok).startswith(f"cannot reach {base}/key (ConnectError)")


def test_metrics_endpoint_counts_what_the_webhook_did(client, upstreams) -> None:
    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    before = client.get("/metrics").get_data(as_text=True)
    post_event(client, wp.text_message("WEBJS"))
    post_event(client, wp.message_ack("WEBJS"))
    after = client.get("/metrics").get_data(as_text=True)
    assert value(after, "webhook_messages_received_total") - value(before, "webhook_messages_received_total") == 1
    assert value(after, "webhook_messages_processed_total") - value(before, "webhook_messages_processed_total") == 1
    assert value(after, "webhook_messages_ignored_total") - value(before, "webhook_messages_ignored_total") == 1


def scraped(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One /metrics scrape as {(sample name, sorted labels): value}, refusing a series that appears twice."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} is exported twice"
            samples[key] = sample.value
    return samples


def backlog(samples: dict) -> dict[str, float]:
    return {dict(labels)["status"]: value for (name, labels), value in samples.items()
            if name == "webhook_inbox_messages"}


def test_metrics_show_the_inbox_backlog_that_stats_counts(make_app, upstreams) -> None:
    # No waiting and a long quiet period: the message stays queued, as a burst still being typed would.
    client = make_app(webhook_sync_wait_seconds=0.0, debounce_seconds=60.0).test_client()
    assert backlog(scraped(client)) == {"queued": 0, "processing": 0, "sending": 0, "merged": 0}
    assert post_event(client, wp.text_message("WEBJS", body="oi")).status_code == 202
    samples = scraped(client)
    stats = client.get("/stats").get_json()["stats"]
    assert backlog(samples) == {"queued": 1, "processing": 0, "sending": 0, "merged": 0}
    assert sum(backlog(samples).values()) == stats["messages_in_progress"] == 1
    assert samples[("webhook_inbox_retrying_messages", ())] == stats["messages_retrying"] == 0


def test_metrics_count_a_reply_waiting_for_its_next_attempt(client, upstreams) -> None:
    upstreams.send_text.side_effect = lambda request: httpx.Response(500, json={"statusCode": 500})
    assert post_event(client, wp.text_message("NOWEB", body="Vocês abrem no domingo?")).status_code == 503
    samples = scraped(client)
    assert backlog(samples)["queued"] == 1
    assert samples[("webhook_inbox_retrying_messages", ())] == 1
    assert samples[("webhook_waha_errors_total", (("endpoint", "/api/sendText"), ("status", "500")))] >= 1


def test_metrics_carry_each_health_check_as_0_ok_1_degraded_2_failing(make_app, upstreams) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(401, json={"error": {"code": 401,
                                                                                    "message": "No auth credentials"}})
    client = make_app().test_client()

    def checks() -> dict[str, float]:
        return {dict(labels)["check"]: value for (name, labels), value in scraped(client).items()
                if name == "webhook_health_check_status"}

    assert checks() == {"store": 0, "llm": 0, "waha": 0}
    post_event(client, wp.text_message("WEBJS"))  # the LLM refuses the key: the customer gets the fallback
    post_event(client, wp.session_status("GOWS", status="SCAN_QR_CODE"))
    assert client.get("/health").get_json()["checks"]["llm"]["status"] == "failing"
    assert checks() == {"store": 0, "llm": 2, "waha": 1}


def test_metrics_keep_answering_when_the_store_is_down(make_app, upstreams) -> None:
    app = make_app()
    store = app.extensions[EXTENSION_KEY].store

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("disk I/O error")

    store.ping = store.snapshot = broken
    samples = scraped(app.test_client())
    assert samples[("webhook_health_check_status", (("check", "store"),))] == 2
    assert backlog(samples) == {}, "an unreadable store must not look like an empty inbox"
    assert ("webhook_inbox_retrying_messages", ()) not in samples
    assert ("webhook_replies_in_flight", ()) in samples  # everything else is still exported


def test_json_logs_carry_the_decision_fields(make_app, upstreams, capsys) -> None:
    client = make_app(log_format="json").test_client()
    envelope = wp.text_message("NOWEB")
    post_event(client, envelope)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    replied = [line for line in lines if line.get("decision") == "replied"]
    assert replied and replied[0]["event"] == envelope["id"] and replied[0]["chat"] == envelope["payload"]["from"]
    assert replied[0]["level"] == "INFO" and "pid" in replied[0]


def _write_logs(path: str, worker: int) -> None:
    handler = SharedRotatingFileHandler(path, max_bytes=4000, backup_count=50)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"rotation-{worker}")
    logger.addHandler(handler)
    logger.propagate = False
    for n in range(300):
        logger.warning("worker=%d line=%04d %s", worker, n, "x" * 40)
    handler.close()


def test_two_processes_rotate_one_log_file_without_losing_lines(tmp_path) -> None:
    path = str(tmp_path / "webhook.log")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_logs, args=(path, worker)) for worker in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=30)
    files = [name for name in os.listdir(tmp_path) if name.startswith("webhook.log") and not name.endswith(".lock")]
    assert len(files) > 2  # it did rotate
    lines = [line for name in files for line in (tmp_path / name).read_text().splitlines()]
    assert len(lines) == 600 and len(set(lines)) == 600
    assert all(os.path.getsize(tmp_path / name) < 4000 + 200 for name in files)


@pytest.mark.parametrize("argv, code, words", [
    (["--help"], 0, "--check-settings"),
    (["--chek"], 2, "unrecognized arguments: --chek"),
    (["--che"], 2, "unrecognized arguments: --che"),  # no guessing at abbreviations
    (["--check", "--check-settings"], 2, "not allowed with"),
])
def test_the_command_line_explains_itself_and_never_starts_a_server_on_a_typo(argv, code, words, capsys) -> None:
    from whatsapp_webhook import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    output = capsys.readouterr()
    assert stopped.value.code == code and words in output.out + output.err
    assert "starting development server" not in output.out + output.err
