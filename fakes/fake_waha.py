"""FakeWaha: WAHA's send endpoints, validated against WAHA's own OpenAPI spec, with engine-shaped replies."""
from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fakes.base import FakeServer, Request, Response, phrase, run_cli

SPEC_PATH = Path(__file__).resolve().parent / "data" / "waha-openapi.json"
_SPEC_URI = "urn:waha-openapi"
SEND_TEXT = "/api/sendText"
PRESENCE_PATHS = ("/api/sendSeen", "/api/startTyping", "/api/stopTyping")
ENGINES = ("WEBJS", "WEBJS_EMPTY", "NOWEB", "GOWS")
NOT_WORKING = "Session status is not as expected. Try again later or restart the session"


@lru_cache(maxsize=1)
def _spec() -> tuple[dict[str, Any], Registry]:
    spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return spec, Registry().with_resource(_SPEC_URI, resource)


@cache
def _validator(path: str) -> Draft202012Validator:
    spec, registry = _spec()
    try:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    except KeyError:
        raise ValueError(f"WAHA spec has no JSON request body for POST {path}") from None
    # Refs like "#/components/schemas/X" must resolve against the whole spec document.
    ref = schema.get("$ref")
    return Draft202012Validator({"$ref": _SPEC_URI + ref} if ref else schema, registry=registry)


def validate_waha_request(path: str, body: Any) -> list[str]:
    """Errors of `body` against the requestBody schema of POST `path` in WAHA's spec ([] = valid)."""
    errors = sorted(_validator(path).iter_errors(body), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message}" for e in errors]


def _hex(n_bytes: int) -> str:
    return secrets.token_hex(n_bytes).upper()


class FakeWaha(FakeServer):
    """Fake WAHA: /ping, GET /api/sessions/{name}, POST sendText/sendSeen/startTyping/stopTyping."""

    config_keys = FakeServer.config_keys | {"session_status", "engine", "other_sessions"}
    OVERSIZE_CHUNK = 64 * 1024

    def __init__(self, *, api_key: str = "test-waha-key", engine: str = "WEBJS", session: str = "default",
                 me_id: str = "11111111111@c.us", host: str = "127.0.0.1", port: int = 0,
                 latency_s: float = 0.0, log_path: str | None = None, session_status: str = "WORKING",
                 other_sessions: tuple[str, ...] = ()) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}")
        super().__init__(host=host, port=port, latency_s=latency_s, log_path=log_path)
        self.api_key, self.engine, self.session = api_key, engine, session
        self.me_id, self.session_status = me_id, session_status
        self.other_sessions = tuple(other_sessions)  # more WORKING sessions (numbers) on this WAHA (WAHA Plus)
        self._delivered: list[dict[str, Any]] = []  # what reached WhatsApp, even if the HTTP answer never did
        # /api/files/...: path -> (bytes, mimetype); a path in _endless streams that many bytes of its file's
        # first bytes plus padding, without Content-Length (more than any cap); _file_bytes_sent counts per path.
        self._files: dict[str, tuple[bytes, str]] = {}
        self._endless: dict[str, int] = {}
        self._file_bytes_sent: dict[str, int] = {}

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._delivered.clear()
            self._files.clear()
            self._endless.clear()
            self._file_bytes_sent.clear()

    # -- media files (WAHA's /api/files, deleted after WHATSAPP_FILES_LIFETIME) ------------------
    def serve_file(self, path: str, data: bytes, mimetype: str) -> None:
        """WAHA has this file at `path` (e.g. /api/files/default/ABC.oga) until expire_file(path)."""
        with self._lock:
            self._files[path] = (data, mimetype)
            self._endless.pop(path, None)

    def serve_oversize(self, path: str, mimetype: str, *, head: bytes, total_bytes: int) -> None:
        """A file of `total_bytes` (starting with `head`) sent chunked, without Content-Length."""
        with self._lock:
            self._files[path] = (head, mimetype)
            self._endless[path] = total_bytes

    def expire_file(self, path: str) -> None:
        """The file's lifetime ran out: WAHA answers 404 from now on."""
        with self._lock:
            self._files.pop(path, None)
            self._endless.pop(path, None)

    def file_bytes_sent(self, path: str) -> int:
        with self._lock:
            return self._file_bytes_sent.get(path, 0)

    def file_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests(method="GET") if r["path"].startswith("/api/files/")]

    def _file(self, path: str) -> Response:
        with self._lock:
            found, total = self._files.get(path), self._endless.get(path)
        if found is None:  # what WAHA's static file route answers for a deleted file
            return Response(404, _nest_error(404, f"Cannot GET {path}"))
        data, mimetype = found

        def count(n: int) -> None:
            with self._lock:
                self._file_bytes_sent[path] = self._file_bytes_sent.get(path, 0) + n

        if total is None:
            count(len(data))
            return Response(200, headers={"Content-Type": mimetype}, raw=data)

        def chunks() -> Any:
            yield data
            for _ in range(max(0, total - len(data)) // self.OVERSIZE_CHUNK):
                yield b"\0" * self.OVERSIZE_CHUNK

        return Response(200, headers={"Content-Type": mimetype}, chunks=chunks(), on_sent=count)

    # -- convenience for assertions ---------------------------------------
    def sent_texts(self) -> list[dict[str, Any]]:
        """Accepted (201) sendText calls in arrival order."""
        return [{k: r["body"].get(k) for k in ("session", "chatId", "text", "reply_to")}
                for r in self.requests(SEND_TEXT, "POST") if r["status"] == 201]

    def delivered_texts(self) -> list[dict[str, Any]]:
        """What customers received, in order: includes sends whose HTTP response was lost (process_then_hang)."""
        with self._lock:
            return [{"session": m["session"], "chatId": m["to"], "text": m["body"]} for m in self._delivered]

    def presence_calls(self, chat_id: str | None = None) -> list[tuple[str, str]]:
        """Accepted (201) sendSeen/startTyping/stopTyping calls as (path, chatId), arrival order."""
        return [(r["path"], r["body"]["chatId"]) for r in self.requests(method="POST")
                if r["path"] in PRESENCE_PATHS and r["status"] == 201
                and (chat_id is None or r["body"]["chatId"] == chat_id)]

    # -- HTTP --------------------------------------------------------------
    def error_body(self, status: int) -> Any:
        if status == 422:
            return self._not_working(self.session)
        if status == 500:  # WAHA's engine-error shape (#2271, #2094)
            return {"statusCode": 500, "timestamp": datetime.now(UTC).isoformat(),
                    "exception": {"message": "Fake engine failure", "name": "Error",
                                  "stack": "Error: Fake engine failure\n    at FakeWaha"}}
        return _nest_error(status, phrase(status))

    def route(self, req: Request) -> Response:
        if req.method == "GET" and req.path == "/ping":
            return Response(200, {"message": "pong"})
        key = req.headers.get("x-api-key") or req.query.get("x-api-key")  # WAHA accepts both
        if req.path.startswith("/api/") and key != self.api_key:
            return Response(401, {"message": "Unauthorized", "statusCode": 401})
        if req.method == "GET" and req.path.startswith("/api/files/"):
            return self._file(req.path)
        if req.method == "GET" and req.path == "/api/sessions":
            return Response(200, [self._session_info(self.session).body])
        if req.method == "GET" and (m := re.fullmatch(r"/api/sessions/([^/]+)", req.path)):
            return self._session_info(m.group(1))
        if req.method == "GET" and (m := re.fullmatch(r"/api/([^/]+)/chats/([^/]+)/messages", req.path)):
            return self._chat_messages(unquote(m.group(1)), unquote(m.group(2)), req.query)
        if req.method == "POST" and req.path in (SEND_TEXT, *PRESENCE_PATHS):
            if not (req.json_ok and isinstance(req.body, dict)):
                return Response(400, _nest_error(400, ["request body must be a JSON object"]))
            if errors := validate_waha_request(req.path, req.body):
                return Response(400, _nest_error(400, errors))
            if req.body["session"] not in (self.session, *self.other_sessions) or self.session_status != "WORKING":
                return Response(422, self._not_working(req.body["session"]))
            if req.path == SEND_TEXT:
                return self._send_text(req.body)
            # sendSeen answers an (empty) object; typing endpoints return void -> empty 201 in NestJS.
            return Response(201, {} if req.path == "/api/sendSeen" else None)
        return Response(404, _nest_error(404, f"Cannot {req.method} {req.path}"))

    def _not_working(self, session: str) -> dict[str, Any]:
        status = self.session_status if session in (self.session, *self.other_sessions) else "STOPPED"
        return {"error": NOT_WORKING, "session": session, "status": status, "expected": ["WORKING"]}

    def _session_info(self, name: str) -> Response:
        if name not in (self.session, *self.other_sessions):
            return Response(404, _nest_error(404, f"We didn't find a session with name '{name}'"))
        working = self.session_status == "WORKING"
        return Response(200, {"name": name, "status": self.session_status, "config": {},
                              "me": {"id": self.me_id, "pushName": "Bot"} if working else None,
                              "engine": {"engine": self.engine.removesuffix("_EMPTY")}})

    def _chat_messages(self, session: str, chat: str, query: dict[str, str]) -> Response:
        """GET /api/{session}/chats/{chatId}/messages: WAMessage list, newest first (only our own sends)."""
        if "limit" not in query:
            return Response(400, _nest_error(400, ["limit must be a number"]))
        since = float(query.get("filter.timestamp.gte", 0))
        with self._lock:
            found = [m for m in self._delivered
                     if m["session"] == session and m["to"] == chat and m["timestamp"] >= since]
        return Response(200, [{k: v for k, v in m.items() if k != "session"}
                              for m in reversed(found)][: int(float(query["limit"]))])

    def _send_text(self, body: dict[str, Any]) -> Response:
        """201 with the engine's raw object: WAHA does not map it to the documented WAMessage."""
        chat, text, now = body["chatId"], body["text"], int(time.time())
        with self._lock:
            self._delivered.append({"id": f"true_{chat}_3EB0{_hex(9)}", "session": body["session"], "timestamp": now,
                                    "from": self.me_id, "fromMe": True, "to": chat, "body": text,
                                    "hasMedia": False, "ack": 1, "ackName": "SERVER"})
        if self.engine == "WEBJS_EMPTY":  # WAHA 2025.6.5 quirk (#1083, #1087)
            return Response(201)
        if self.engine == "NOWEB":  # Baileys WebMessageInfo (#760, #407)
            jid = chat.replace("@c.us", "@s.whatsapp.net")
            return Response(201, {"key": {"remoteJid": jid, "fromMe": True, "id": "BAE5" + _hex(6)},
                                  "message": {"extendedTextMessage": {"text": text}},
                                  "messageTimestamp": str(now), "status": "PENDING"})
        if self.engine == "GOWS":  # messageResponse(): {id: serialized id, _data: parsed whatsmeow message}
            msg_id = f"true_{chat}_3EB0{_hex(9)}" + (f"_{self.me_id}" if chat.endswith("@g.us") else "")
            return Response(201, {"id": msg_id, "_data": {"extendedTextMessage": {"text": text}}})
        msg_id = "3EB0" + _hex(10)  # WEBJS: whatsapp-web.js Message (#1615)
        id_obj = {"fromMe": True, "remote": chat, "id": msg_id, "_serialized": f"true_{chat}_{msg_id}"}
        return Response(201, {
            "_data": {"id": id_obj, "body": text, "type": "chat", "t": now, "from": self.me_id, "to": chat,
                      "self": "out", "ack": 0, "isNewMsg": True},
            "id": id_obj, "ack": 0, "hasMedia": False, "body": text, "type": "chat", "timestamp": now,
            "from": self.me_id, "to": chat, "deviceType": "web", "isForwarded": False, "forwardingScore": 0,
            "isStatus": False, "isStarred": False, "fromMe": True, "hasQuotedMsg": bool(body.get("reply_to")),
            "hasReaction": False, "vCards": [], "mentionedIds": [], "links": []})


def _nest_error(status: int, message: Any) -> dict[str, Any]:
    return {"statusCode": status, "message": message, "error": phrase(status)}


if __name__ == "__main__":
    run_cli(FakeWaha, "Fake WAHA server", lambda p: (
        p.add_argument("--engine", choices=ENGINES),
        p.add_argument("--session"),
        p.add_argument("--me-id", dest="me_id"),
        p.add_argument("--session-status", dest="session_status")))
