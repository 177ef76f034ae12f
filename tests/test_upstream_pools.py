"""The upstream HTTP pools: many small pools side by side, against a real HTTP server on loopback.

These run over real sockets (no respx) because what they check is connection handling:
how many TCP connections carry how many requests, and that nothing is left counted as busy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from whatsapp_webhook.concurrency import ShardedPoolTransport
from whatsapp_webhook.upstream import upstream_client


class LoopbackServer:
    """A tiny keep-alive HTTP/1.1 server that records which client connection carried each request.

    `hold` makes every request for a path under /held wait until that many are being held at once,
    so a test can prove that N requests were really in flight together (on N connections).
    """

    def __init__(self, *, hold: int = 0, proxy: bool = False) -> None:
        self.hold = hold
        self.proxy = proxy
        self.request_lines: list[str] = []
        self.peers: list[int] = []
        self._held = 0
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[1]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                await reader.readexactly(length)
                self.request_lines.append(lines[0])
                self.peers.append(peer)
                if self.hold and lines[0].split(" ")[1].startswith("/held"):
                    self._held += 1
                    if self._held >= self.hold:
                        self._release.set()
                    await asyncio.wait_for(self._release.wait(), 10)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                             b'{"ok":true}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(scenario: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 30))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def sharded_client(max_connections: int) -> AsyncIterator[tuple[httpx.AsyncClient, ShardedPoolTransport]]:
    transport = ShardedPoolTransport(max_connections=max_connections)
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        yield client, transport


def test_pools_are_small_and_together_hold_the_configured_connections() -> None:
    assert ShardedPoolTransport(max_connections=256).shard_count == 32
    assert ShardedPoolTransport(max_connections=100).shard_count == 13
    assert ShardedPoolTransport(max_connections=1).shard_count == 1


def test_as_many_requests_in_flight_at_once_as_configured_connections() -> None:
    """40 requests held open together: no small pool may make one of them wait for another."""
    async def scenario() -> None:
        async with LoopbackServer(hold=40) as upstream, sharded_client(40) as (client, transport):
            responses = await asyncio.gather(*(client.post(upstream.url + "/held", json={"n": i}) for i in range(40)))
            assert [r.json() for r in responses] == [{"ok": True}] * 40
            assert len(set(upstream.peers)) == 40  # one connection per request in flight
            assert transport.requests_in_flight == 0

    run(scenario)


def test_a_new_request_goes_to_a_pool_with_a_free_connection() -> None:
    """Slow and quick calls interleaved: slow ones must not pile up in one pool while another has room."""
    async def scenario() -> None:
        async with LoopbackServer(hold=24) as upstream, sharded_client(32) as (client, transport):
            slow = []
            for i in range(24):
                slow.append(asyncio.create_task(client.get(f"{upstream.url}/held/{i}")))
                await asyncio.sleep(0.005)  # let it reach the server before the quick call
                assert (await client.get(upstream.url + "/quick")).status_code == 200
            assert all(r.status_code == 200 for r in await asyncio.gather(*slow))
            assert transport.requests_in_flight == 0

    run(scenario)


def test_connections_are_kept_alive_and_reused() -> None:
    async def scenario() -> None:
        async with LoopbackServer() as upstream, sharded_client(64) as (client, transport):
            for _ in range(3):
                responses = await asyncio.gather(*(client.get(upstream.url + "/ping") for _ in range(8)))
                assert all(r.status_code == 200 for r in responses)
            assert len(upstream.peers) == 24
            assert len(set(upstream.peers)) <= 8  # later rounds rode the first round's connections
            assert transport.requests_in_flight == 0

    run(scenario)


def test_a_failed_or_abandoned_request_does_not_stay_counted() -> None:
    async def scenario() -> None:
        async with sharded_client(16) as (client, transport):
            with pytest.raises(httpx.ConnectError):
                await client.get("http://127.0.0.1:9/unreachable")  # discard port: connection refused
            assert transport.requests_in_flight == 0
            async with LoopbackServer() as upstream:
                async with client.stream("GET", upstream.url + "/stream"):
                    assert transport.requests_in_flight == 1  # body not read yet: the connection is busy
                assert transport.requests_in_flight == 0  # closed unread

    run(scenario)


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


def test_without_a_proxy_the_worker_uses_small_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def scenario() -> None:
        async with LoopbackServer(hold=20) as upstream:
            async with upstream_client(transport=None, max_connections=20,
                                              timeout=httpx.Timeout(5)) as client:
                responses = await asyncio.gather(*(client.get(upstream.url + "/held") for _ in range(20)))
            assert all(r.status_code == 200 for r in responses)
            assert upstream.request_lines[0] == "GET /held HTTP/1.1"  # straight to the server

    run(scenario)
