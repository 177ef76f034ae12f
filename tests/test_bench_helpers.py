"""The benchmark's own arithmetic (bench/run_bench.py): percentiles, matching a sendText to the message it
answers, reading the fake WAHA's log, the fake's receive time that run 5's figures rest on, and run 3's steps
per chat (bench/run3_steps.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from bench import run3_steps
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


def _llm_call(at: float, *turns: tuple[str, str]) -> dict[str, object]:
    messages = [{"role": "system", "content": "You are the assistant #r3-000777"}]
    messages += [{"role": role, "content": content} for role, content in turns]
    return {"path": "/api/v1/chat/completions", "t_wall": at, "status": 200, "body": {"messages": messages}}


def _send(at: float, text: str, status: int = 201) -> dict[str, object]:
    return {"path": "/api/sendText", "t_wall": at, "status": status, "body": {"chatId": "x@c.us", "text": text}}


def test_run3_steps_time_each_chats_turns_from_the_fakes_logs() -> None:
    """Two chats, two messages each (tokens 0, 1 first messages; 2, 3 second ones), times after t0 = 1000."""
    records = [
        _send(999.0, "warm-up #r3-000000"),  # before the run: ignored
        _llm_call(1000.30, ("user", "hi #r3-000000")),
        _llm_call(1000.50, ("user", "hi #r3-000001")),
        _llm_call(1001.55, ("user", "again #r3-000000")),  # a retry: the first request counts
        _send(1001.40, "Echo #r3-000000"),  # 1000.30 + 1 s of LLM -> 100 ms to sendText
        _send(1001.52, "Echo #r3-000001", status=500),  # refused: not the reply
        _send(1001.60, "Echo #r3-000001"),
        # The second message's request carries the first as history: only its last user turn is its own.
        _llm_call(1001.70, ("user", "hi #r3-000000"), ("assistant", "Echo #r3-000000"), ("user", "and #r3-000002")),
        _send(1002.72, "Echo #r3-000002"),
        _llm_call(1001.90, ("user", [{"type": "text", "text": "photo #r3-000003"}])),  # multimodal parts
        _llm_call(1001.85, ("user", "photo #r3-000003")),  # arrived first, logged last (the fake logs on answering)
    ]
    llm, sends = run3_steps.first_calls(records, tag="r3", since=1000.0)
    assert llm == {0: 1000.30, 1: 1000.50, 2: 1001.70, 3: 1001.85}  # the earliest arrival of each
    assert sends == {0: 1001.40, 1: 1001.60, 2: 1002.72}  # 777 was never a message; 3 got no reply
    # Chat 1's second message reached us (t0 + 1.80) after its first reply was answered (1001.65).
    arrivals = {(0, 0): 0.10, (1, 0): 0.20, (0, 1): 0.20, (1, 1): 1.80}
    steps = run3_steps.per_chat_steps(
        arrivals, llm, sends, t0=1000.0, chats=2, per_chat=2, llm_latency=1.0, waha_latency=0.05
    )
    assert steps[run3_steps.FIRST_REQUEST] == pytest.approx([200.0, 300.0])  # recorded -> its LLM request
    assert steps[run3_steps.TO_SEND] == pytest.approx([100.0, 20.0, 100.0])  # chat by chat, message by message
    # the previous reply's sendText answered (sent + 50 ms), or the message recorded if later -> its LLM request
    assert steps[run3_steps.NEXT_TURN] == pytest.approx([250.0, 50.0])


def test_run3_steps_leave_out_a_record_still_being_written(tmp_path: Path) -> None:
    log = tmp_path / "fake-llm.jsonl"
    whole = json.dumps(_llm_call(1000.3, ("user", "hi #r3-000000")))
    log.write_text(whole + "\n" + whole[:40])
    assert run3_steps.read_log(log) == [json.loads(whole)]
