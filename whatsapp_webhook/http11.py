"""A lean HTTP/1.1 transport under httpx: keep-alive connections per origin, no pool walk.

httpx stays the client API (timeouts, Request/Response, raise_for_status, json, the exception
types our callers map). What it replaces is the stack under httpx's default transport
(httpcore, h11, anyio): measured side by side on loopback it cost 0.42 ms of CPU per request
against this transport's 0.17 ms, and a reply makes two or more requests (bench/README.md,
"Where the time went").

What it does, and what it leaves out on purpose:
- HTTP/1.1 only, over TCP or TLS (the LLM and WAHA both speak it). Responses framed by
  Content-Length, chunked transfer coding, or the connection's end; 1xx interim answers skipped.
- Connections are kept per origin and reused last-in first-out; one idle longer than
  KEEPALIVE_EXPIRY_SECONDS, or that the server already closed, is dropped instead of reused.
- At most `max_connections` requests in flight at once; a request waits for a free slot up to the
  pool timeout and then raises httpx.PoolTimeout.
- A request is never retried here: a POST that may have reached the server must not be sent
  twice (sendText). ConnectError / ConnectTimeout / PoolTimeout mean nothing left this host;
  every other error may come after the request left (upstream.NOT_SENT relies on this).
- Proxies are not supported: upstream_client keeps httpx's own transport when one is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import Enum

import httpx

KEEPALIVE_EXPIRY_SECONDS = 4.0  # under Node's default keepAliveTimeout (5 s), which WAHA runs on
READ_CHUNK = 64 * 1024
MAX_INTERIM_ANSWERS = 8  # 1xx answers skipped before the real one; more is a misbehaving server
MAX_HEAD_BYTES = 64 * 1024  # the StreamReader's limit: a longer status line + headers is a protocol error
NO_TIMEOUT: dict[str, float | None] = {}
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_HEADER_BYTES = re.compile(rb"[\x00\r\n]")


class Framing(Enum):
    """How the end of a response body is found."""

    NONE = "none"  # HEAD, 204, 304
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    readable: select.poll | None = None  # this socket, registered once: is it readable while idle?

    def __post_init__(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            self.readable = select.poll()  # not select(): fds above 1024 (hundreds of upstream sockets per worker)
            self.readable.register(sock.fileno(), select.POLLIN)

    def is_reusable(self, now: float) -> bool:
        # Bytes nobody asked for (a server sending past its Content-Length) would be the next request's answer.
        leftover: bytes = getattr(self.reader, "_buffer", b"")
        if (
            now - self.idle_since >= KEEPALIVE_EXPIRY_SECONDS
            or self.reader.at_eof()
            or self.writer.is_closing()
            or leftover
        ):
            return False
        # Readable while idle = a FIN (or bytes) the loop has not processed yet: the server closed it.
        return self.readable is None or not self.readable.poll(0)

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class _Head:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    framing: Framing
    length: int
    keep_alive: bool


@dataclass(slots=True)
class _Origin:
    idle: deque[_Connection] = field(default_factory=deque)  # oldest first: reuse from the right, expire from the left


@contextlib.contextmanager
def _mapped(
    request: httpx.Request, *, timeout: type[httpx.TimeoutException], error: type[httpx.TransportError]
) -> Iterator[None]:
    """One exception mapper: what the socket says, as the httpx exception our callers expect."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(str(exc) or f"{timeout.__name__} after waiting", request=request) from exc
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a complete response.", request=request
        ) from exc
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("Response head or chunk line too long.", request=request) from exc
    except (OSError, ssl.SSLError) as exc:
        raise error(str(exc) or type(exc).__name__, request=request) from exc


def _protocol_error(message: str, request: httpx.Request) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(message, request=request)


def parse_head(raw: bytes, *, method: bytes, request: httpx.Request) -> _Head:
    """Parse a status line and headers (the bytes up to and including the blank line)."""
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise _protocol_error(f"Not an HTTP/1.x status line: {lines[0][:80]!r}", request)
    status = int(code)
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    connection = b""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise _protocol_error(f"Malformed response header line: {line[:80]!r}", request)
        value = value.strip()
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length is not None and int(value) != length):
                raise _protocol_error(f"Bad Content-Length: {value[:40]!r}", request)
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        elif lowered == b"connection":
            connection = value.lower()
    keep_alive = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        framing, size = Framing.NONE, 0
    elif chunked:
        framing, size = Framing.CHUNKED, 0
    elif length is not None:
        framing, size = Framing.LENGTH, length
    else:
        framing, size, keep_alive = Framing.UNTIL_CLOSE, 0, False
    return _Head(status, reason, headers, framing, size, keep_alive)


@dataclass(slots=True)
class _RequestHead:
    raw: bytes
    content_length: bytes | None
    chunked: bool


def _request_head(request: httpx.Request) -> _RequestHead:
    """The request line and headers, and the two headers that frame the body, in one pass over the raw list
    (httpx's Headers.get decodes every header on each lookup: ~10 % of a request's CPU here)."""
    lines = [request.method.encode("ascii") + b" " + request.url.raw_path + b" HTTP/1.1"]
    content_length: bytes | None = None
    chunked = False
    for name, value in request.headers.raw:
        if _BAD_HEADER_BYTES.search(name + value) or b":" in name or not name.strip():
            raise httpx.LocalProtocolError(f"Illegal header {name[:40]!r}", request=request)
        lines.append(name + b": " + value)
        lowered = name.lower()
        if lowered == b"content-length":
            content_length = value
        elif lowered == b"transfer-encoding":
            chunked = value.lower() == b"chunked"
    return _RequestHead(b"\r\n".join(lines) + b"\r\n\r\n", content_length, chunked)


class ResponseBody(httpx.AsyncByteStream):
    """A response body read straight off its connection; closing it returns the connection or closes it."""

    def __init__(
        self,
        transport: KeepAliveTransport,
        key: tuple[bytes, bytes, int],
        connection: _Connection,
        head: _Head,
        *,
        read_timeout: float | None,
        request: httpx.Request,
    ) -> None:
        self._transport = transport
        self._key = key
        self._connection: _Connection | None = connection
        self._head = head
        self._read_timeout = read_timeout
        self._request = request
        self._complete = head.framing is Framing.NONE or (head.framing is Framing.LENGTH and head.length == 0)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._complete or self._connection is None:
            return
        reader = self._connection.reader
        with _mapped(self._request, timeout=httpx.ReadTimeout, error=httpx.ReadError):
            if self._head.framing is Framing.LENGTH:
                remaining = self._head.length
                while remaining:
                    chunk = await self._read(reader, min(remaining, READ_CHUNK))
                    if not chunk:
                        raise _protocol_error(
                            "Server closed the connection before the whole body arrived.", self._request
                        )
                    remaining -= len(chunk)
                    yield chunk
            elif self._head.framing is Framing.CHUNKED:
                async for chunk in self._chunks(reader):
                    yield chunk
            else:
                while chunk := await self._read(reader, READ_CHUNK):
                    yield chunk
        self._complete = True

    async def _read(self, reader: asyncio.StreamReader, size: int) -> bytes:
        """Up to `size` bytes. Only a wait (nothing buffered yet) needs the read timeout's timer: a small JSON
        answer usually arrived with its head."""
        if getattr(reader, "_buffer", None):
            return await reader.read(size)
        async with asyncio.timeout(self._read_timeout):
            return await reader.read(size)

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            async with asyncio.timeout(self._read_timeout):
                line = await reader.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].rstrip(b"\r\n \t")
            if not _HEX.fullmatch(size_text):
                raise _protocol_error(f"Bad chunk size line: {line[:40]!r}", self._request)
            size = int(size_text, 16)
            if size == 0:
                async with asyncio.timeout(self._read_timeout):
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                        pass
                return
            while size:
                data = await self._read(reader, min(size, READ_CHUNK))
                if not data:
                    raise _protocol_error("Server closed the connection inside a chunk.", self._request)
                size -= len(data)
                yield data
            async with asyncio.timeout(self._read_timeout):
                if await reader.readexactly(2) != b"\r\n":
                    raise _protocol_error("Chunk not followed by CRLF.", self._request)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:  # once, however often the body is closed
            return
        reusable = self._complete and self._head.keep_alive
        if not reusable:
            connection.close()
        self._transport._release(self._key, connection if reusable else None)


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 keep-alive connections per origin, at most `max_connections` requests in flight."""

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_connections
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}
        self._ssl_context = ssl_context
        self._in_flight = 0
        self._closed = False

    @property
    def requests_in_flight(self) -> int:
        return self._in_flight

    @property
    def idle_connections(self) -> int:
        return sum(len(origin.idle) for origin in self._origins.values())

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()  # loading the CA bundle costs ~25 ms: once, when needed
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}", request=request)
        key = (url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", NO_TIMEOUT)
        with _mapped(request, timeout=httpx.PoolTimeout, error=httpx.ConnectError):
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        self._in_flight += 1
        connection: _Connection | None = None
        try:
            connection = self._idle_connection(key) or await self._connect(key, request, timeouts.get("connect"))
            await self._send(connection, request, timeouts.get("write"))
            head = await self._read_head(connection, request, timeouts.get("read"))
        except BaseException:
            if connection is not None:
                connection.close()
            self._release(key, None)
            raise
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=ResponseBody(self, key, connection, head, read_timeout=timeouts.get("read"), request=request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    def _idle_connection(self, key: tuple[bytes, bytes, int]) -> _Connection | None:
        origin = self._origins.get(key)
        if origin is None:
            return None
        now = asyncio.get_running_loop().time()
        while origin.idle:
            connection = origin.idle.pop()
            if connection.is_reusable(now):
                return connection
            connection.close()
        return None

    async def _connect(
        self, key: tuple[bytes, bytes, int], request: httpx.Request, timeout: float | None
    ) -> _Connection:
        scheme, host, port = key
        tls = self._tls() if scheme == b"https" else None
        with _mapped(request, timeout=httpx.ConnectTimeout, error=httpx.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host.decode("ascii"),
                    port,
                    ssl=tls,
                    server_hostname=host.decode("ascii") if tls else None,
                    limit=MAX_HEAD_BYTES,
                )
        return _Connection(reader, writer)

    async def _send(self, connection: _Connection, request: httpx.Request, timeout: float | None) -> None:
        head = _request_head(request)
        writer = connection.writer
        with _mapped(request, timeout=httpx.WriteTimeout, error=httpx.WriteError):
            try:
                body = request.content
            except httpx.RequestNotRead:  # a streamed upload
                async with asyncio.timeout(timeout):
                    writer.write(head.raw)
                    async for part in request.stream:  # type: ignore[union-attr]
                        if part:
                            writer.write(b"%x\r\n%s\r\n" % (len(part), part) if head.chunked else part)
                            await writer.drain()
                    if head.chunked:
                        writer.write(b"0\r\n\r\n")
                    await writer.drain()
                return
            if head.content_length is not None and head.content_length != b"%d" % len(body):
                raise httpx.LocalProtocolError("Content-Length is not the body's length", request=request)
            writer.write(head.raw + body)
            if writer.transport.get_write_buffer_size():  # the socket did not take it all at once: wait for it
                async with asyncio.timeout(timeout):
                    await writer.drain()

    async def _read_head(self, connection: _Connection, request: httpx.Request, timeout: float | None) -> _Head:
        method = request.method.encode("ascii")
        with _mapped(request, timeout=httpx.ReadTimeout, error=httpx.ReadError):
            async with asyncio.timeout(timeout):  # one deadline for the answer, interim ones included
                for _ in range(MAX_INTERIM_ANSWERS + 1):
                    raw = await connection.reader.readuntil(b"\r\n\r\n")
                    head = parse_head(raw, method=method, request=request)
                    if head.status == 101:  # never asked for: the connection now speaks something else
                        raise _protocol_error("Unexpected 101 Switching Protocols.", request)
                    if not 100 <= head.status < 200:
                        return head
        raise _protocol_error(f"More than {MAX_INTERIM_ANSWERS} interim (1xx) answers.", request)

    def _release(self, key: tuple[bytes, bytes, int], connection: _Connection | None) -> None:
        """A request is over: free its slot, and keep its connection for the next one when it can be reused."""
        self._in_flight -= 1
        self._slots.release()
        if connection is None:
            return
        if self._closed:
            connection.close()
            return
        origin = self._origins.setdefault(key, _Origin())
        now = asyncio.get_running_loop().time()
        while origin.idle and now - origin.idle[0].idle_since >= KEEPALIVE_EXPIRY_SECONDS:
            origin.idle.popleft().close()  # expired: the server has (or soon will have) closed it
        if len(origin.idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = now
        origin.idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True  # a body closed after this closes its connection instead of keeping it
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
        await asyncio.sleep(0)  # let the closed sockets' transports finish before the loop may stop
