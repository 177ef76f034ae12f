"""Live checks against a running WhatsApp webhook server.

    python test_webhook_server.py                       # http://localhost:5002
    python test_webhook_server.py https://bot.example.com
    python test_webhook_server.py URL --send-to 5511999999999@c.us   # also one real reply (opt-in)

Checks health, stats, the webhook GET, that events a bot must not answer are ignored,
and that bad input gets clear JSON errors. Only --send-to makes the server talk to
the LLM and send a WhatsApp message. Signature settings are read from the environment
or .env.webhook (WEBHOOK_SECRET_TOKEN, WEBHOOK_HMAC_KEY), or given as flags.
The ignored and rejected requests it sends show up in the server's /stats.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

WEBHOOK = "/api/v1/whatsapp/webhook"
CUSTOMER = "5511988887777@c.us"
BOT = "5511900000000@c.us"


def envelope(event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A WAHA (WEBJS engine) envelope, keys as WAHA sends them."""
    return {"id": "evt_" + uuid.uuid4().hex[:26], "timestamp": int(time.time() * 1000), "event": event,
            "session": "default", "metadata": {}, "me": {"id": BOT, "pushName": "Bot"}, "payload": payload,
            "engine": "WEBJS", "environment": {"version": "2026.7.1", "engine": "WEBJS", "tier": "CORE"}}


def message_payload(chat: str, body: str, *, from_me: bool = False, source: str = "app") -> dict[str, Any]:
    bare = "3EB0" + uuid.uuid4().hex[:18].upper()
    return {"id": f"{'true' if from_me else 'false'}_{chat}_{bare}", "timestamp": int(time.time()), "from": chat,
            "fromMe": from_me, "source": source, "to": BOT, "participant": None, "body": body, "hasMedia": False,
            "media": None, "ack": 1, "ackName": "SERVER", "replyTo": None, "_data": {}}


IGNORED_EVENTS: list[tuple[str, dict[str, Any], str]] = [
    ("delivery receipt (message.ack)", envelope("message.ack", {
        "id": f"true_{CUSTOMER}_3EB0AAAAAAAAAAAAAAAAAA", "from": CUSTOMER, "participant": None, "fromMe": True,
        "ack": 3, "ackName": "READ"}), "event_not_handled"),
    # Not session.status: that one is recorded for /health, and a made-up status must never mask the real one.
    ("reaction (message.reaction)", envelope("message.reaction", {
        "id": f"false_{CUSTOMER}_3EB0BBBBBBBBBBBBBBBBBB", "from": CUSTOMER, "fromMe": False,
        "reaction": {"text": "👍", "messageId": f"true_{CUSTOMER}_3EB0AAAAAAAAAAAAAAAAAA"}}), "event_not_handled"),
    ("bot's own API send (message.any)", envelope("message.any", message_payload(
        CUSTOMER, "live-suite echo", from_me=True, source="api")), "from_me"),
    ("status broadcast", envelope("message", message_payload("status@broadcast", "live-suite status")),
     "status_broadcast"),
    ("channel post", envelope("message", message_payload("120363000000000009@newsletter", "live-suite post")),
     "channel"),
]


class LiveSuite:
    def __init__(self, base_url: str, *, token: str | None, hmac_key: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.hmac_key = hmac_key
        self.http = httpx.Client(timeout=timeout)
        self.passed = 0
        self.failed = 0

    def check(self, name: str, test: Callable[[], None]) -> None:
        try:
            test()
        except Exception as exc:  # a live suite reports every failure and goes on
            self.failed += 1
            print(f"FAIL {name}: {exc}")
        else:
            self.passed += 1
            print(f"PASS {name}")

    def post(self, body: bytes, *, content_type: str = "application/json", sign: bool = True) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if sign and self.token:
            headers["X-Webhook-Token"] = self.token
        if sign and self.hmac_key:
            headers["X-Webhook-Hmac"] = hmac.new(self.hmac_key.encode(), body, hashlib.sha512).hexdigest()
            headers["X-Webhook-Hmac-Algorithm"] = "sha512"
        return self.http.post(self.base_url + WEBHOOK, content=body, headers=headers)

    def get_json(self, path: str, expected_status: str, service: str = "whatsapp_webhook_server") -> dict[str, Any]:
        response = self.http.get(self.base_url + path)
        document = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        problems = "; ".join(f"{name}: {check.get('status')} ({check.get('reason')})"
                             for name, check in (document.get("checks") or {}).items() if check.get("status") != "ok")
        expect(response.status_code == 200, f"HTTP {response.status_code}: {problems or response.text[:200]}")
        expect(document.get("status") == expected_status,
               f"status is {document.get('status')!r}" + (f": {problems}" if problems else ""))
        expect(document.get("service") == service, f"service is {document.get('service')!r}, expected {service!r}")
        for name in ("service", "version", "uptime_seconds", "stats", "timestamp"):
            expect(name in document, f"field {name!r} missing")
        if path == "/health":
            expect(set(document.get("checks") or {}) >= {"store", "llm", "waha"}, "checks store, llm, waha missing")
        for name in ("messages_received", "messages_processed", "messages_failed", "server_started_at"):
            expect(name in document["stats"], f"field stats.{name} missing")
        return document

    def run(self, send_to: str | None) -> int:
        print(f"Live checks against {self.base_url}")
        self.check("GET /health is healthy", lambda: self.get_json("/health", "healthy"))
        before = self.get_json("/stats", "ok")["stats"] if self._reachable() else {}
        self.check("GET /stats has the counters", lambda: self.get_json("/stats", "ok"))
        self.check(f"GET {WEBHOOK} describes the endpoint",
                   lambda: self.get_json(WEBHOOK, "ok", service="whatsapp_webhook"))

        for name, event, reason in IGNORED_EVENTS:
            self.check(f"ignored: {name}", lambda e=event, r=reason: self.expect_ignored(e, r))
        duplicate = envelope("message.ack", IGNORED_EVENTS[0][1]["payload"])
        self.check("the same event twice is answered twice with 200",
                   lambda: [self.expect_ignored(duplicate, "event_not_handled") for _ in range(2)])

        self.check("invalid JSON gets 400 JSON", lambda: self.expect_error(self.post(b"{not json"), 400))
        self.check("a JSON array gets 400 JSON", lambda: self.expect_error(self.post(b"[1, 2]"), 400))
        self.check("an empty body gets 400 JSON", lambda: self.expect_error(self.post(b""), 400))
        self.check("invalid UTF-8 gets 400 JSON", lambda: self.expect_error(self.post(b"\xff\xfe\xfd"), 400))
        self.check("wrong field type gets 400 JSON", lambda: self.expect_error(
            self.post(json.dumps({"event": 42}).encode()), 400))
        self.check("text/plain gets 415 JSON", lambda: self.expect_error(
            self.post(b'{"event": "message"}', content_type="text/plain"), 415))
        self.check("a 2 MB body gets 413 JSON", lambda: self.expect_error(
            self.post(b'{"event": "message", "pad": "' + b"x" * 2_000_000 + b'"}'), 413))
        if self.token or self.hmac_key:
            self.check("an unsigned request gets 401 JSON", lambda: self.expect_error(
                self.post(json.dumps(IGNORED_EVENTS[0][1]).encode(), sign=False), 401))
        self.check("the server still serves after bad input", lambda: self.get_json("/health", "healthy"))
        if before:
            self.check("stats counted the ignored events", lambda: self.expect_counted(before))
        if send_to:
            self.check(f"a real message from {send_to} is answered", lambda: self.expect_reply(send_to))
        print(f"{self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1

    def _reachable(self) -> bool:
        try:
            return self.http.get(self.base_url + "/stats").status_code == 200
        except httpx.HTTPError:
            return False

    def expect_ignored(self, event: dict[str, Any], reason: str) -> None:
        response = self.post(json.dumps(event, separators=(",", ":")).encode())
        expect(response.status_code == 200, f"HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        expect(body.get("status") == "ignored" and body.get("reason") == reason, f"got {body}")

    @staticmethod
    def expect_error(response: httpx.Response, status: int) -> None:
        expect(response.status_code == status, f"HTTP {response.status_code} instead of {status}")
        expect(isinstance(response.json().get("error"), str), f"no JSON error: {response.text[:200]}")

    def expect_counted(self, before: dict[str, Any]) -> None:
        # Each gunicorn worker writes its counts of ignored events about once a second: another may lag behind.
        for _ in range(30):
            after = self.get_json("/stats", "ok")["stats"]
            grew = after.get("messages_ignored", 0) - before.get("messages_ignored", 0)
            if grew >= len(IGNORED_EVENTS) + 2:
                break
            time.sleep(0.1)
        expect(grew >= len(IGNORED_EVENTS) + 2, f"messages_ignored grew by {grew}")
        expect(after["messages_received"] >= before["messages_received"], "messages_received went down")

    def expect_reply(self, chat: str) -> None:
        event = envelope("message", message_payload(chat, "Olá! Isto é um teste do servidor de respostas."))
        response = self.post(json.dumps(event).encode())
        expect(response.status_code in (200, 202), f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code == 200:
            result = response.json()["result"]
            expect(result["response_sent"] and result["from_number"] == chat, f"got {result}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Live checks against a running WhatsApp webhook server.")
    parser.add_argument("url", nargs="?", default="http://localhost:5002")
    parser.add_argument("--token", help="X-Webhook-Token (default: WEBHOOK_SECRET_TOKEN)")
    parser.add_argument("--hmac-key", help="WAHA HMAC key (default: WEBHOOK_HMAC_KEY)")
    parser.add_argument("--send-to", metavar="CHAT_ID",
                        help="also send one real message from this chat id and expect a reply (talks to the LLM and WAHA)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        from dotenv import load_dotenv
        load_dotenv(".env.webhook", override=False)
    except ImportError:
        pass
    suite = LiveSuite(args.url, token=args.token or os.environ.get("WEBHOOK_SECRET_TOKEN") or None,
                      hmac_key=args.hmac_key or os.environ.get("WEBHOOK_HMAC_KEY") or None, timeout=args.timeout)
    return suite.run(args.send_to)


if __name__ == "__main__":
    sys.exit(main())
