"""The worker's HTTP/1.1 transport under httpx, against real HTTP servers on loopback (no respx).

What these check is what a socket shows: how many connections carry how many requests, how a
response body ends, what each failure is raised as (callers decide from the type whether a
sendText may have reached WAHA), and that no request slot or connection is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from whatsapp_webhook.http11 import KeepAliveTransport
from whatsapp_webhook.upstream import NOT_SENT, upstream_client

# (request line, body) -> raw response; None = hang up without answering; (raw, True) = hang up after it
Reply = Callable[[str, bytes], Awaitable["bytes | tuple[bytes, bool] | None"]]


def ok(body: bytes = b'{"ok":true}', *, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


async def always_ok(line: str, body: bytes) -> bytes:
    return ok()


class LoopbackServer:
    """A keep-alive HTTP/1.1 server that records which client connection carried each request.

    `reply` writes the raw response (so a test can send chunked bodies, bad heads, early hang-ups);
    `hold` makes requests under /held wait until that many are held at once, so a test can prove
    that N requests were really in flight together.
    """

    def __init__(self, reply: Reply = always_ok, *, hold: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.hold = hold
        self.tls = tls
        self.request_lines: list[str] = []
        self.heads: list[str] = []
        self.bodies: list[bytes] = []
        self.peers: list[int] = []
        self.connections = 0
        self._held = 0
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    def release_held(self) -> None:
        self._release.set()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._release.set()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[1]
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                if any(line.lower() == "transfer-encoding: chunked" for line in lines):
                    body = b""
                    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readuntil(b"\r\n")
                else:
                    body = await reader.readexactly(length)
                self.request_lines.append(lines[0])
                self.heads.append(head)
                self.bodies.append(body)
                self.peers.append(peer)
                if self.hold and lines[0].split(" ")[1].startswith("/held"):
                    self._held += 1
                    if self._held >= self.hold:
                        self._release.set()
                    await asyncio.wait_for(self._release.wait(), 10)
                response = await self.reply(lines[0], body)
                if response is None:
                    break
                raw, hang_up = response if isinstance(response, tuple) else (response, False)
                writer.write(raw)
                await writer.drain()
                if hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def run(scenario: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 30))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def client_for(max_connections: int = 16, *, timeout: float | httpx.Timeout = 5,
                     ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[httpx.AsyncClient, KeepAliveTransport]]:
    transport = KeepAliveTransport(max_connections=max_connections, ssl_context=ssl_context)
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        yield client, transport


# --- connections ------------------------------------------------------------------------------------------

def test_as_many_requests_in_flight_at_once_as_configured_connections() -> None:
    """40 requests held open together: none waits for another, each has its own connection."""
    async def scenario() -> None:
        async with LoopbackServer(hold=40) as upstream, client_for(40) as (client, transport):
            responses = await asyncio.gather(*(client.post(upstream.url + "/held", json={"n": i}) for i in range(40)))
            assert [r.json() for r in responses] == [{"ok": True}] * 40
            assert len(set(upstream.peers)) == 40
            assert transport.requests_in_flight == 0

    run(scenario)


def test_connections_are_kept_alive_and_reused() -> None:
    async def scenario() -> None:
        async with LoopbackServer() as upstream, client_for(64) as (client, transport):
            for _ in range(3):
                responses = await asyncio.gather(*(client.get(upstream.url + "/ping") for _ in range(8)))
                assert all(r.status_code == 200 for r in responses)
            assert len(upstream.peers) == 24
            assert upstream.connections <= 8  # later rounds rode the first round's connections
            assert transport.requests_in_flight == 0 and transport.idle_connections == upstream.connections

    run(scenario)


def test_a_request_beyond_the_limit_waits_for_a_slot_then_times_out_as_not_sent() -> None:
    async def scenario() -> None:
        async with LoopbackServer(hold=3) as upstream, \
                client_for(2, timeout=httpx.Timeout(5, pool=0.2)) as (client, transport):
            held = [asyncio.create_task(client.get(upstream.url + "/held")) for _ in range(2)]
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout) as caught:
                await client.get(upstream.url + "/third")
            assert isinstance(caught.value, NOT_SENT)
            assert upstream.request_lines == ["GET /held HTTP/1.1"] * 2  # the third never left
            upstream.release_held()
            assert [(await task).status_code for task in held] == [200, 200]
            assert (await client.get(upstream.url + "/third")).status_code == 200  # a slot is free again
            assert transport.requests_in_flight == 0

    run(scenario)


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """A server may drop a keep-alive connection without saying so (its idle timeout): the next request
    must open a new one, not fail on the dead one. sendText is not retried, so this must never error."""
    async def reply(line: str, body: bytes) -> bytes | tuple[bytes, bool]:
        return (ok(), True) if "/last" in line else ok()  # answers as keep-alive, then hangs up

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, transport):
            assert (await client.get(upstream.url + "/a")).status_code == 200
            assert (await client.get(upstream.url + "/last")).status_code == 200
            await asyncio.sleep(0.05)  # its FIN arrives while the connection is idle
            assert transport.idle_connections == 1
            assert (await client.post(upstream.url + "/api/sendText", json={})).status_code == 200
            assert upstream.connections == 2

    run(scenario)


def test_connection_close_and_http_1_0_answers_are_not_kept() -> None:
    answers = [ok(extra=b"Connection: close\r\n"),
               b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]  # no length: the body ends with the connection

    async def reply(line: str, body: bytes) -> bytes | None:
        return answers[int(line.split(" ")[1].strip("/"))]

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, transport):
            assert (await client.get(upstream.url + "/0")).json() == {"ok": True}
            assert (await client.get(upstream.url + "/1")).text == "ok"
            assert upstream.connections == 2 and transport.idle_connections == 0
            async with client.stream("GET", upstream.url + "/2") as response:
                first = await response.aiter_raw().__anext__()
                assert first == b"until the end"
            assert upstream.connections == 3 and transport.idle_connections == 0

    run(scenario)


def test_an_idle_connection_older_than_the_keepalive_expiry_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("whatsapp_webhook.http11.KEEPALIVE_EXPIRY_SECONDS", 0.05)

    async def scenario() -> None:
        async with LoopbackServer() as upstream, client_for() as (client, _):
            await client.get(upstream.url + "/a")
            await asyncio.sleep(0.1)
            await client.get(upstream.url + "/b")
            assert upstream.connections == 2

    run(scenario)


# --- bodies -----------------------------------------------------------------------------------------------

def test_a_chunked_body_with_extensions_and_trailers_is_read_whole() -> None:
    async def chunked(line: str, body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                b"5;ext=1\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\nX-Trailer: yes\r\n\r\n")

    async def scenario() -> None:
        async with LoopbackServer(chunked) as upstream, client_for() as (client, _):
            for _ in range(2):
                assert (await client.get(upstream.url + "/c")).json() == {"a": 1}
            assert upstream.connections == 1  # the connection stayed usable after the last chunk

    run(scenario)


def test_a_body_larger_than_a_read_arrives_intact_and_a_gzip_one_is_decoded() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    packed = gzip.compress(json.dumps({"text": "olá " * 1000}).encode())

    async def reply(line: str, body: bytes) -> bytes:
        if "/big" in line:
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed)

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, _):
            assert (await client.get(upstream.url + "/big")).content == big
            assert (await client.get(upstream.url + "/gz")).json() == {"text": "olá " * 1000}
            async with client.stream("GET", upstream.url + "/big") as streamed:
                raw = b"".join([chunk async for chunk in streamed.aiter_raw()])
            assert raw == big
            assert upstream.connections == 1

    run(scenario)


def test_interim_100_answers_are_skipped_and_head_204_and_304_have_no_body() -> None:
    async def reply(line: str, body: bytes) -> bytes:
        if line.startswith("HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
        if "/empty" in line:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if "/cached" in line:
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 500\r\n\r\n"
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok()

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, _):
            assert (await client.post(upstream.url + "/x", content=b"abc")).json() == {"ok": True}
            head = await client.head(upstream.url + "/x")
            assert head.status_code == 200 and head.content == b""
            assert (await client.delete(upstream.url + "/empty")).status_code == 204
            assert (await client.get(upstream.url + "/cached")).content == b""
            assert (await client.get(upstream.url + "/again")).json() == {"ok": True}
            assert upstream.connections == 1

    run(scenario)


def test_the_request_goes_out_with_its_headers_and_body_and_a_streamed_upload_chunked() -> None:
    async def scenario() -> None:
        async with LoopbackServer() as upstream, client_for() as (client, _):
            await client.post(upstream.url + "/api/sendText?x=1", json={"text": "oi"}, headers={"X-Api-Key": "k"})

            async def parts() -> AsyncIterator[bytes]:
                yield b"hello "
                yield b"world"
            await client.post(upstream.url + "/upload", content=parts())
        first, second = upstream.heads
        assert upstream.bodies == [b'{"text":"oi"}', b"hello world"]
        assert first.startswith("POST /api/sendText?x=1 HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{upstream.port}" in first.lower() and "x-api-key: k" in first.lower()
        assert "content-length: 13" in first.lower()
        assert "transfer-encoding: chunked" in second.lower()

    run(scenario)


# --- failures: what each one is raised as -----------------------------------------------------------------

def test_a_refused_connection_is_a_connect_error_that_never_left() -> None:
    async def scenario() -> None:
        async with client_for() as (client, transport):
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get("http://127.0.0.1:9/unreachable")  # discard port: refused
            assert isinstance(caught.value, NOT_SENT) and transport.requests_in_flight == 0

    run(scenario)


@pytest.mark.parametrize("answer, error", [
    (None, httpx.RemoteProtocolError),  # hung up without answering: the request may have been acted on
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"partial\"", True), httpx.RemoteProtocolError),
    (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", httpx.RemoteProtocolError),  # not ValueError
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", httpx.RemoteProtocolError),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", httpx.RemoteProtocolError),  # never asked for
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + ok(), httpx.RemoteProtocolError),  # interim answers without end
])
def test_a_broken_answer_is_a_protocol_error_that_may_have_been_sent(answer: bytes | tuple[bytes, bool] | None,
                                                                     error: type[Exception]) -> None:
    async def reply(line: str, body: bytes) -> bytes | tuple[bytes, bool] | None:
        return ok() if "/good" in line else answer

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, transport):
            with pytest.raises(error) as caught:
                await client.post(upstream.url + "/api/sendText", json={"text": "oi"})
            assert not isinstance(caught.value, NOT_SENT)
            assert transport.requests_in_flight == 0
            assert (await client.get(upstream.url + "/good")).json() == {"ok": True}  # and the client goes on
            assert transport.idle_connections == 1

    run(scenario)


def test_a_server_that_never_answers_is_a_read_timeout_and_its_connection_is_dropped() -> None:
    async def silent(line: str, body: bytes) -> bytes:
        if "/good" in line:
            return ok()
        await asyncio.sleep(5)
        return ok()

    async def scenario() -> None:
        async with LoopbackServer(silent) as upstream, client_for(timeout=0.2) as (client, transport):
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.get(upstream.url + "/slow")
            assert not isinstance(caught.value, NOT_SENT)
            assert transport.requests_in_flight == 0 and transport.idle_connections == 0
            assert (await client.get(upstream.url + "/good")).status_code == 200
            assert upstream.connections == 2

    run(scenario)


def test_a_cancelled_request_or_an_abandoned_body_frees_its_slot_and_drops_its_connection() -> None:
    async def reply(line: str, body: bytes) -> bytes:
        if "/slow" in line:
            await asyncio.sleep(5)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for(1) as (client, transport):
            task = asyncio.create_task(client.get(upstream.url + "/slow"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert transport.requests_in_flight == 0
            async with client.stream("GET", upstream.url + "/stream") as response:
                assert transport.requests_in_flight == 1  # the body is not read yet: the slot is taken
                await response.aiter_raw(1000).__anext__()
            assert transport.requests_in_flight == 0 and transport.idle_connections == 0  # half read: not reusable
            assert len((await client.get(upstream.url + "/whole")).content) == 100000  # the one slot is free
            assert transport.idle_connections == 1

    run(scenario)


# --- TLS ----------------------------------------------------------------------------------------------------

def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_https_is_spoken_over_a_verified_tls_connection_and_kept_alive(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def scenario() -> None:
        async with LoopbackServer(tls=server_tls) as upstream:
            async with client_for(ssl_context=client_tls) as (client, _):
                for _ in range(3):
                    assert (await client.post(upstream.url + "/v1/chat/completions", json={})).json() == {"ok": True}
            assert upstream.connections == 1
            async with client_for() as (untrusting, transport):  # the system CAs do not know this certificate
                with pytest.raises(httpx.ConnectError) as caught:
                    await untrusting.get(upstream.url + "/x")
                assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) and transport.requests_in_flight == 0

    run(scenario)


# --- which transport the worker's clients get ---------------------------------------------------------------

def test_a_configured_proxy_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours HTTP_PROXY only with its own transport: the worker's clients must keep doing so."""
    async def scenario() -> None:
        async with LoopbackServer() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            async with upstream_client(transport=None, max_connections=16, timeout=httpx.Timeout(5)) as client:
                response = await client.get("http://waha.invalid:3000/api/sessions")
            assert response.status_code == 200
            assert proxy.request_lines == ["GET http://waha.invalid:3000/api/sessions HTTP/1.1"]

    run(scenario)


def test_without_a_proxy_the_worker_uses_the_keep_alive_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def scenario() -> None:
        async with LoopbackServer(hold=20) as upstream:
            async with upstream_client(transport=None, max_connections=20, timeout=httpx.Timeout(5)) as client:
                responses = await asyncio.gather(*(client.get(upstream.url + "/held") for _ in range(20)))
                assert isinstance(client._transport, KeepAliveTransport)
            assert all(r.status_code == 200 for r in responses)
            assert upstream.request_lines[0] == "GET /held HTTP/1.1"  # straight to the server

    run(scenario)


# --- timeouts: each phase its own, and which ones mean "never left" -------------------------------------------

def test_a_connect_that_never_completes_is_a_connect_timeout_that_never_left() -> None:
    """A listener whose accept queue is full drops new SYNs: the connect hangs. Only the connect timeout
    (0.2 s) applies there, not the read timeout (30 s): the scenario's own 30 s limit would fail first."""
    import socket

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (never accepted); later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)

    async def scenario() -> None:
        async with client_for(timeout=httpx.Timeout(30, connect=0.2)) as (client, transport):
            with pytest.raises(httpx.ConnectTimeout) as caught:
                await client.post(f"http://127.0.0.1:{port}/api/sendText", json={})
            assert isinstance(caught.value, NOT_SENT) and transport.requests_in_flight == 0

    try:
        run(scenario)
    finally:
        for sock in (*fillers, full):
            sock.close()


def test_a_server_that_stops_reading_is_a_write_timeout_that_may_have_been_sent() -> None:
    async def scenario() -> None:
        stalled = asyncio.Event()

        async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await stalled.wait()
            writer.close()

        server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with client_for(timeout=httpx.Timeout(30, write=0.3)) as (client, transport):
                with pytest.raises(httpx.WriteTimeout) as caught:
                    await client.post(f"http://127.0.0.1:{port}/upload", content=b"x" * (64 * 1024 * 1024))
                assert not isinstance(caught.value, NOT_SENT) and transport.requests_in_flight == 0
        finally:
            stalled.set()
            server.close()

    run(scenario)


# --- what must never happen on a kept-alive connection ------------------------------------------------------

def test_bytes_left_after_a_response_are_never_read_as_the_next_response() -> None:
    """A server that sends past its Content-Length: the extra bytes must not become the next caller's answer."""
    async def reply(line: str, body: bytes) -> bytes:
        if "/first" in line:
            return ok(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
        return ok(b"fresh")

    async def scenario() -> None:
        async with LoopbackServer(reply) as upstream, client_for() as (client, _):
            assert (await client.get(upstream.url + "/first")).text == "ok"
            await asyncio.sleep(0.05)
            assert (await client.post(upstream.url + "/api/sendText", json={})).text == "fresh"
            assert upstream.connections == 2

    run(scenario)


def test_a_connection_closed_while_the_loop_was_busy_is_not_reused() -> None:
    """The server's FIN is in the kernel but the client's loop has not run since (busy with other replies),
    so asyncio does not know yet: the transport must still see it and open a new connection for the sendText.
    The server runs on a thread of its own, so it can hang up while the client's loop is blocked."""
    started, ports = threading.Event(), []
    stop = threading.Event()

    async def answer_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ok())
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.close()

    def serve() -> None:
        async def main() -> None:
            server = await asyncio.start_server(answer_then_hang_up, "127.0.0.1", 0)
            ports.append(server.sockets[0].getsockname()[1])
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            server.close()
        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)

    async def scenario() -> None:
        async with client_for() as (client, _):
            await client.get(f"http://127.0.0.1:{ports[0]}/a")
            time.sleep(0.2)  # the loop is blocked while the server's FIN arrives
            assert (await client.post(f"http://127.0.0.1:{ports[0]}/api/sendText", json={})).status_code == 200

    try:
        run(scenario)
    finally:
        stop.set()
        thread.join(5)


def test_a_huge_chunk_reaches_the_caller_in_pieces_so_a_size_cap_can_stop_it() -> None:
    """media_fetch stops at MEDIA_MAX_BYTES by counting what aiter_raw yields: one 32 MiB chunk must not be
    buffered whole before the first piece arrives."""
    size = 32 * 1024 * 1024
    sent = [0]

    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % size)
            block = b"x" * (1024 * 1024)
            with contextlib.suppress(ConnectionError):
                for _ in range(size // len(block)):
                    writer.write(block)
                    await writer.drain()
                    sent[0] += len(block)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with client_for() as (client, transport):
            async with client.stream("GET", f"http://127.0.0.1:{port}/file") as response:
                await response.aiter_raw(64 * 1024).__anext__()
                assert sent[0] < 4 * 1024 * 1024, f"first piece only after {sent[0]} bytes"
            assert transport.requests_in_flight == 0 and transport.idle_connections == 0
        server.close()

    run(scenario)


def test_an_abandoned_body_or_a_connection_close_answer_closes_the_socket() -> None:
    """media_fetch gives up past its cap; the server must see the client hang up, not a socket left open."""
    async def scenario() -> None:
        hung_up = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 70000)
            await writer.drain()
            if await reader.read(1) == b"":
                hung_up.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with client_for() as (client, _):
            async with client.stream("GET", f"http://127.0.0.1:{port}/file") as response:
                await response.aiter_raw(1000).__anext__()
            await asyncio.wait_for(hung_up.wait(), 5)  # closed by us, not by a garbage collection some day
        server.close()

    run(scenario)


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async def scenario() -> None:
        async with LoopbackServer() as upstream, client_for() as (client, transport):
            with pytest.raises(httpx.LocalProtocolError):
                await client.post(upstream.url + "/api/sendText", json={}, headers={"X-Api-Key": "k\r\nX-Injected: 1"})
            with pytest.raises(httpx.LocalProtocolError):
                await client.post(upstream.url + "/api/sendText", content=b"abcdef", headers={"Content-Length": "3"})
            assert upstream.request_lines == [] and transport.requests_in_flight == 0

    run(scenario)


def test_idle_connections_past_their_expiry_are_closed_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("whatsapp_webhook.http11.KEEPALIVE_EXPIRY_SECONDS", 0.2)

    async def scenario() -> None:
        async with LoopbackServer(hold=10) as upstream, client_for() as (client, transport):
            await asyncio.gather(*(client.get(upstream.url + "/held") for _ in range(10)))
            assert transport.idle_connections == 10
            await asyncio.sleep(0.3)
            await client.get(upstream.url + "/one")  # steady traffic afterwards
            assert transport.idle_connections == 1

    run(scenario)


def test_a_body_closed_after_the_transport_was_closed_closes_its_connection() -> None:
    async def scenario() -> None:
        async with LoopbackServer() as upstream:
            transport = KeepAliveTransport(max_connections=4)
            client = httpx.AsyncClient(transport=transport, timeout=5)
            response = await client.send(client.build_request("GET", upstream.url + "/x"), stream=True)
            await client.aclose()
            await response.aread()
            await response.aclose()
            assert transport.idle_connections == 0 and transport.requests_in_flight == 0

    run(scenario)


def test_a_body_that_stops_arriving_is_a_read_timeout_for_every_framing() -> None:
    """The read timeout applies to each read of the body too, not only to the head."""
    async def scenario() -> None:
        for head in (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n",
                     b"HTTP/1.1 200 OK\r\n\r\n"):
            async def stall(line: str, body: bytes, head: bytes = head) -> bytes:
                return head + b"partial"  # and then nothing, with the connection open

            async with LoopbackServer(stall) as upstream, \
                    client_for(timeout=httpx.Timeout(30, read=0.2)) as (client, transport):
                with pytest.raises(httpx.ReadTimeout):
                    await client.get(upstream.url + "/slow-body")
                assert transport.requests_in_flight == 0 and transport.idle_connections == 0

    run(scenario)
