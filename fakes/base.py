"""FakeServer: a threaded HTTP/1.1 fake upstream with request recording and scripted faults."""
from __future__ import annotations

import argparse
import copy
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self, TextIO
from urllib.parse import parse_qs, urlsplit

HANG_S = 3600.0  # "hang" without delay_s: long enough for any client timeout to fire first


@dataclass
class Request:
    """One parsed request; `body` is the decoded JSON if `json_ok`, else the raw text (None if empty)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any
    json_ok: bool


@dataclass
class Response:
    """What to send: `raw` bytes win over `body`; dict/list bodies are sent as JSON, str as text.

    `chunks` (an iterable of bytes) is sent with chunked transfer encoding instead, one write per chunk,
    stopping when the client goes away; `on_sent(n)` is told each chunk's size once it is written.
    """

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    chunks: Any = None
    on_sent: Any = None


@dataclass
class FaultRule:
    """A scripted misbehaviour for requests whose path equals or ends with `path`."""

    path: str
    status: int | None = None
    body: Any = None
    headers: dict[str, str] | None = None
    delay_s: float = 0.0
    times: int | None = 1  # remaining uses; None = forever
    raw_body: str | bytes | None = None
    kind: str | None = None
    drop_connection: bool = False

    @property
    def delay_only(self) -> bool:
        return (self.status is None and self.body is None and self.raw_body is None
                and self.kind is None and not self.drop_connection)


def path_matches(pattern: str, path: str) -> bool:
    """Exact match, or suffix match so "/chat/completions" matches any base-URL prefix."""
    return path == pattern or path.endswith(pattern)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like WAHA's and OpenRouter's clients expect
    disable_nagle_algorithm = True  # avoid Nagle/delayed-ACK stalls on small responses
    fake: FakeServer  # set by FakeServer.start() on a per-server subclass

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, add=True)

    def finish(self) -> None:
        self.fake._track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        self.fake._dispatch(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client resets etc. are expected under fault injection; never spam stderr


class FakeServer:
    """Base fake: subclasses implement `route()` and may extend `fault_response()` / `error_body()`."""

    # "hang": no answer; "process_then_hang": do the work (e.g. deliver the text), then never answer.
    fault_kinds: frozenset[str] = frozenset({"hang", "process_then_hang"})
    config_keys: frozenset[str] = frozenset({"latency_s"})  # settable via POST /_fake/config

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 log_path: str | None = None) -> None:
        self.host, self.port, self.latency_s, self.log_path = host, port, latency_s, log_path
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._faults: list[FaultRule] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log: TextIO | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._stopping.clear()
        self._server = _Server((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        if self.log_path:
            self._log = open(self.log_path, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes delayed/hanging handlers
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise keep being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(5)
        if self._log:
            self._log.close()
            self._log = None
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recording and faults ---------------------------------------------
    def requests(self, path: str | None = None, method: str | None = None) -> list[dict[str, Any]]:
        """Copies of recorded requests (arrival order), optionally filtered by path (exact/suffix) and method."""
        with self._lock:
            return [copy.deepcopy(r) for r in self._records
                    if (path is None or path_matches(path, r["path"]))
                    and (method is None or r["method"] == method.upper())]

    def add_fault(self, path: str, *, status: int | None = None, body: Any = None,
                  headers: dict[str, str] | None = None, delay_s: float = 0.0, times: int | None = 1,
                  raw_body: str | bytes | None = None, kind: str | None = None,
                  drop_connection: bool = False) -> None:
        """Append a rule; rules for a path fire in insertion order, each `times` times (None/0 = forever)."""
        if kind is not None and kind not in self.fault_kinds:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(self.fault_kinds)}")
        rule = FaultRule(path, status, body, headers, float(delay_s or 0), times or None, raw_body, kind,
                         drop_connection)
        with self._lock:
            self._faults.append(rule)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget faults and recorded requests."""
        with self._lock:
            self._faults.clear()
            self._records.clear()

    def _take_fault(self, path: str) -> FaultRule | None:
        with self._lock:
            for i, rule in enumerate(self._faults):
                if path_matches(rule.path, path):
                    if rule.times is not None:
                        rule.times -= 1  # remaining uses
                        if rule.times <= 0:
                            del self._faults[i]
                    return rule
        return None

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- hooks for subclasses ---------------------------------------------
    def route(self, req: Request) -> Response:
        """Normal (non-faulted) handling."""
        raise NotImplementedError

    def error_body(self, status: int) -> Any:
        """Body for a fault rule that gives a status but no body."""
        return {"statusCode": status, "message": phrase(status)}

    def fault_response(self, req: Request, rule: FaultRule) -> Response:
        """Response for a non-delay-only rule (drop/hang are handled before this)."""
        status = rule.status or 200
        raw = rule.raw_body.encode() if isinstance(rule.raw_body, str) else rule.raw_body
        body = rule.body if rule.body is not None or status < 400 else self.error_body(status)
        return Response(status, body, dict(rule.headers or {}), raw)

    # -- request pipeline --------------------------------------------------
    def _dispatch(self, h: _Handler) -> None:
        try:
            req = _read_request(h)
        except (ValueError, OSError):
            h.close_connection = True
            self._send(h, Response(400, {"message": "malformed request"}))
            return
        if req.path.startswith("/_fake/"):
            self._send(h, self._control(req))
            return
        record = {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers,
                  "body": req.body, "t_mono": time.monotonic(), "t_wall": time.time(),
                  "status": None, "fault": None}
        with self._lock:
            self._records.append(record)
        rule = self._take_fault(req.path)
        resp: Response | None = None
        if rule is not None:
            record["fault"] = rule.kind or ("drop" if rule.drop_connection else rule.status or "delay")
            hangs = rule.kind in ("hang", "process_then_hang")
            if rule.kind == "process_then_hang":
                self.route(req)
            wait = rule.delay_s or (HANG_S if hangs else 0.0)
            if wait:
                self._stopping.wait(wait)
            if rule.drop_connection or hangs or self._stopping.is_set():
                h.close_connection = True  # closing without a response
                self._log_record(record)
                return
            if not rule.delay_only:
                resp = self.fault_response(req, rule)
        if resp is None:
            if self.latency_s and self._stopping.wait(self.latency_s):
                h.close_connection = True
                self._log_record(record)
                return
            try:
                resp = self.route(req)
            except Exception as exc:  # a fake bug must surface as a 500, not kill the connection thread
                resp = Response(500, {"message": f"fake server error: {exc!r}"})
            if rule is not None and rule.headers:
                resp.headers.update(rule.headers)
        record["status"] = resp.status
        self._send(h, resp)
        self._log_record(record)

    def _log_record(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
            with self._lock:
                if self._log is not None:
                    self._log.write(line)
                    self._log.flush()

    def _send_chunked(self, h: _Handler, resp: Response) -> None:
        headers = {k.title(): v for k, v in resp.headers.items()}
        headers.update({"Transfer-Encoding": "chunked", "Date": formatdate(usegmt=True), "Connection": "close"})
        h.close_connection = True
        head = f"HTTP/1.1 {resp.status} {phrase(resp.status)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            h.wfile.write(head.encode("latin-1"))
            for chunk in resp.chunks:
                if self._stopping.is_set():
                    return
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                h.wfile.flush()
                if resp.on_sent is not None:
                    resp.on_sent(len(chunk))
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading: that is what an oversize test wants to see

    def _send(self, h: _Handler, resp: Response) -> None:
        if resp.chunks is not None:
            self._send_chunked(h, resp)
            return
        headers = {k.title(): v for k, v in resp.headers.items()}
        if resp.raw is not None:
            payload = resp.raw
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        elif resp.body is None:
            payload = b""
        elif isinstance(resp.body, str):
            payload = resp.body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            payload = json_bytes(resp.body)
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers["Content-Length"] = str(len(payload))
        headers["Date"] = formatdate(usegmt=True)
        if h.close_connection:
            headers["Connection"] = "close"
        head = f"HTTP/1.1 {resp.status} {phrase(resp.status)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:  # one write: headers and body in the same segment
            h.wfile.write(head.encode("latin-1") + payload)
        except OSError:
            h.close_connection = True

    # -- control endpoints (scripting from another process) ----------------
    def _control(self, req: Request) -> Response:
        key = (req.method, req.path)
        body = req.body if isinstance(req.body, dict) else {}
        try:
            if key == ("POST", "/_fake/faults"):
                rules = body.get("rules")
                if not isinstance(rules, list):
                    raise ValueError('expected {"rules": [...]}')
                for rule in rules:
                    self.add_fault(**rule)
                return Response(200, {"ok": True, "added": len(rules)})
            if key == ("DELETE", "/_fake/faults"):
                self.clear_faults()
                return Response(200, {"ok": True})
            if key == ("GET", "/_fake/requests"):
                return Response(200, {"requests": self.requests(req.query.get("path"), req.query.get("method"))})
            if key == ("POST", "/_fake/reset"):
                self.reset()
                return Response(200, {"ok": True})
            if key == ("POST", "/_fake/config"):
                unknown = set(body) - self.config_keys
                if unknown:
                    raise ValueError(f"unknown config keys {sorted(unknown)}; allowed {sorted(self.config_keys)}")
                for name, value in body.items():
                    setattr(self, name, value)
                return Response(200, {"ok": True, **{k: getattr(self, k) for k in sorted(self.config_keys)}})
        except (TypeError, ValueError) as exc:
            return Response(400, {"error": str(exc)})
        return Response(404, {"error": f"no control endpoint {req.method} {req.path}"})


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _read_request(h: _Handler) -> Request:
    parts = urlsplit(h.path)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while (size := int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
        while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        raw = b"".join(chunks)
    else:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
    body: Any = None
    json_ok = False
    if raw:
        try:
            body, json_ok = json.loads(raw), True
        except ValueError:
            body = raw.decode("utf-8", "replace")
    headers = {k.lower(): v for k, v in h.headers.items()}
    return Request(h.command, parts.path, query, headers, body, json_ok)


def run_cli(factory: type[FakeServer], description: str, add_args: Any = None) -> None:
    """Shared CLI: parse common flags (+ `add_args(parser)`), serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", dest="api_key")
    parser.add_argument("--latency", dest="latency_s", type=float, default=0.0,
                        help="seconds added to every normal response")
    parser.add_argument("--log", dest="log_path", help="append one JSON line per request to this file")
    if add_args:
        add_args(parser)
    kwargs = {k: v for k, v in vars(parser.parse_args()).items() if v is not None}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake = factory(**kwargs).start()
    print(f"listening on {fake.url}", flush=True)
    stop.wait()
    fake.stop()
