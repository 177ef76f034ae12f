"""The benchmark's own arithmetic (bench/run_bench.py): percentiles, matching a sendText to the message it
answers, reading the fake WAHA's log, and the fake's receive time that run 5's figures rest on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from bench.run_bench import ReplyLog, check_once, percentile, reply_delays
from fakes import FakeWaha

TEXT = {"session": "default", "chatId": "22222222222@c.us", "text": "hello"}


def test_percentile_interpolates_between_the_closest_ranks() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3  # order of the input does not matter
    assert percentile([10, 20], 50) == 15
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([7, 1, 3], 0) == 1 and percentile([7, 1, 3], 100) == 7
    assert percentile([4.5], 99) == 4.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_each_sendtext_is_matched_to_its_own_message_by_token() -> None:
    posted = {"o5a-000000": 100.0, "o5a-000001": 200.0, "o5a-000002": 300.0}
    delivered = [
        (200.5, "o5a-000001"),
        (100.004, "o5a-000000"),
        (100.9, "o5a-000000"),  # a later second copy: the first arrival is the reply's start
        (50.0, "w-000003"),  # a warm-up reply, not posted in the run
    ]
    delays = reply_delays(posted, delivered)
    assert delays == {"o5a-000000": pytest.approx(0.004), "o5a-000001": pytest.approx(0.5)}  # 000002: no reply
    assert reply_delays(posted, delivered, window_s=0.4)["o5a-000001"] == pytest.approx(0.1)
    check = check_once(posted, delivered)
    assert (check.answered_once, check.duplicates, check.missing, check.unexpected) == (1, 1, 1, 1)


def test_reply_log_reads_tokens_of_accepted_sendtexts_across_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "waha.jsonl"
    log.write_text(
        json.dumps({"path": "/api/sendText", "t_wall": 1.0, "status": 201, "body": {"text": "old reply #o5a-000009"}})
        + "\n"
    )
    replies = ReplyLog(log)  # follows the log from now on
    merged = json.dumps(
        {
            "path": "/api/sendText",
            "t_wall": 2.5,
            "status": 201,
            "body": {"text": "one answer to a burst #o5b-000001 #o5b-000002"},
        }
    )
    refused = json.dumps({"path": "/api/sendText", "t_wall": 3.0, "status": 500, "body": {"text": "#o5a-000004"}})
    seen = json.dumps({"path": "/api/sendSeen", "t_wall": 2.0, "status": 201, "body": {}})
    with open(log, "a") as out:
        out.write(seen + "\n" + merged[:20])
    replies.poll()
    with open(log, "a") as out:
        out.write(merged[20:] + "\n" + refused + "\n")
    replies.poll()
    assert replies.delivered("o5") == [(2.5, "o5b-000001"), (2.5, "o5b-000002")]
    assert replies.distinct("o5b") == 2 and replies.distinct("o5a") == 0
    assert replies.failed_sends("o5a") == 1
    assert replies.other_paths["/api/sendSeen"] == 1


def test_the_fake_waha_logs_when_a_request_arrived_not_when_it_answered(tmp_path: Path) -> None:
    """Run 5 measures up to the sendText's t_wall: it must be the arrival, before the fake's own latency."""
    log = tmp_path / "waha.jsonl"
    with FakeWaha(log_path=str(log), latency_s=0.3) as waha, httpx.Client(timeout=5) as client:
        sent = time.time()
        r = client.post(f"{waha.url}/api/sendText", json=TEXT, headers={"X-Api-Key": "test-waha-key"})
        answered = time.time()
    assert r.status_code == 201
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert sent <= record["t_wall"] <= answered - 0.3  # the answer came a whole latency after the arrival
