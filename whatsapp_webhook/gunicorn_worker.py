"""gthread with a deadline for reading each request, so slow clients cannot hold the server's threads.

gunicorn 27's gthread worker gives a connection to a thread once its first byte is there, and the thread
then reads headers and body with blocking recv() calls that have no time limit: a client that sends a byte
every few seconds keeps its thread as long as it likes, and 64 such clients hold every thread of the default
deployment (2 workers x 32 threads). gthread bounds only the wait for the first byte (5 s) and the drain of
an unread body after the answer (5 s, 64 KiB). ReadDeadlineWorker adds a deadline for the whole request:

  * The worker's main thread (its poller, non-blocking) gathers the headers and a body of up to
    GATHER_BODY_BYTES announced by Content-Length; only then does a thread take the connection. A client
    that trickles its headers or a small body costs a buffer here, not a thread.
  * What a thread still reads for the request (a larger or chunked body) goes through DeadlineUnreader,
    whose recv() waits only until the request's deadline, then raises RequestReadTimeout.

The deadline is REQUEST_READ_TIMEOUT_SECONDS after the connection was accepted or, on a kept-alive
connection, after the next request's first byte. A connection still gathering then is closed (checked on
each turn of gthread's loop, so up to a second late).

The app may also ask for a connection to be closed after its answer (environ[CLOSE_CONNECTION_KEY]()),
when it refused a body without reading it (413): gthread would otherwise drain the rest first.

Closing: gthread closes a finished connection in its main thread with gunicorn.util.close_graceful, which
blocks up to 2 s reading what the client still sends (so that unread bytes do not turn the close into a
reset that could cut the answer short): a client that simply stays silent stops the whole worker for 2 s,
once per connection. Here the poller does that lingering without blocking (`_linger`), and a connection
that ran out of time is closed at once.

gunicorn's own TLS (certfile) and HTTP/2 cleartext need the socket's first bytes in the thread: with either,
nothing is gathered and only the deadline applies.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from gunicorn import util
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from whatsapp_webhook import CLOSE_CONNECTION_KEY
from whatsapp_webhook.logs import log
from whatsapp_webhook.metrics import SLOW_REQUESTS_CLOSED
from whatsapp_webhook.policy import EveryMinute

HEAD_LIMIT_BYTES = 64 * 1024  # headers longer than this go to gunicorn's parser, which enforces its limits
GATHER_BODY_BYTES = 64 * 1024  # WAHA's events are a few KiB; larger bodies are read by a thread, under the deadline
LINGER_SECONDS, LINGER_BYTES = 2.0, 64 * 1024  # gunicorn.util.close_graceful's bounds


class RequestReadTimeout(NoMoreData, TimeoutError):  # type: ignore[misc]
    """The request's deadline passed while it was being read.

    gunicorn's parser takes it as NoMoreData (the connection is dropped, logged at debug level only);
    the app sees a TimeoutError and answers 408.
    """

    def __str__(self) -> str:
        return "the request did not arrive within REQUEST_READ_TIMEOUT_SECONDS"


class DeadlineConn(TConn):  # type: ignore[misc]
    """A gthread connection that knows its request's deadline and what the poller gathered of it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.deadline: float | None = None
        self.head: bytearray | None = None  # bytes gathered by the poller, handed to the parser first
        self.searched = 0  # how much of `head` is known to hold no end of headers
        self.need = 0  # the length `head` must reach before a thread takes over (0: until the headers end)
        self.timed_out = False
        self.closed = False
        self.linger: Callable[[DeadlineConn], None] | None = None  # the worker's, for a graceful close
        self.drained = 0  # bytes read away while lingering

    def init(self) -> None:
        first = not self.initialized
        super().init()
        if first and self.parser is not None and not self.is_http2:
            unreader = DeadlineUnreader(self.sock, self)
            unreader.buf = self.parser.unreader.buf  # bytes an HTTP/2 preface check gave back
            self.parser.unreader = unreader

    def take_head(self) -> bytes:
        head, self.head = self.head, None
        return bytes(head or b"")

    def close(self, graceful: bool = False) -> None:
        """Called by gthread's main thread; a graceful close lingers in the poller instead of blocking it."""
        if self.closed:
            return
        self.closed = True
        if graceful and not self.timed_out and self.linger is not None:
            self.linger(self)
        else:
            util.close(self.sock)


class DeadlineUnreader(SocketUnreader):  # type: ignore[misc]
    """gunicorn's socket reader, serving the gathered bytes first and never waiting past the deadline."""

    def __init__(self, sock: socket.socket, conn: DeadlineConn) -> None:
        super().__init__(sock)
        self.conn = conn

    def chunk(self, size_hint: int | None = None) -> bytes:
        if head := self.conn.take_head():
            return head
        deadline = self.conn.deadline
        if deadline is None:
            return cast(bytes, super().chunk(size_hint))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.conn.timed_out = True
            raise RequestReadTimeout()
        prior = self.sock.gettimeout()  # gunicorn's own bound, when it drains an unread body
        self.sock.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            return cast(bytes, super().chunk(size_hint))
        except TimeoutError:
            if time.monotonic() < deadline:
                raise  # gunicorn's shorter bound ran out: its own handling applies
            self.conn.timed_out = True
            raise RequestReadTimeout() from None
        finally:
            self.sock.settimeout(prior)


def body_to_gather(headers: bytes) -> int:
    """How much body the poller gathers: a Content-Length of at most GATHER_BODY_BYTES, else none.

    Only a hint: gunicorn's parser still decides what the request is. Anything unusual (a second
    Content-Length, Transfer-Encoding, Expect: 100-continue, which waits for our go-ahead) leaves the
    body to the thread.
    """
    length: int | None = None
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                return 0
            length = int(value)
        elif name in (b"transfer-encoding", b"expect"):
            return 0
    return length if length is not None and length <= GATHER_BODY_BYTES else 0


def receive_now(sock: socket.socket) -> bytes | None:
    """One non-blocking read: the bytes, b"" when the client is gone, None when nothing is there after all."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class ReadDeadlineWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, with every request read under a deadline (gunicorn.conf.py: worker_class)."""

    read_timeout_seconds = 10.0  # gunicorn.conf.py's post_fork sets REQUEST_READ_TIMEOUT_SECONDS
    wsgi: Any  # the app, set by gunicorn's load_wsgi

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gathering: dict[DeadlineConn, None] = {}  # insertion order is deadline order
        self.lingering: dict[DeadlineConn, float] = {}  # closing connections -> when to stop waiting
        self.gathers = not self.cfg.is_ssl and getattr(self.cfg, "http2_cleartext", "off") == "off"
        self._notices = EveryMinute()
        self._notices_lock = threading.Lock()  # timeouts are reported by the main thread and request threads

    # --- the main thread: accept, gather, expire -----------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = DeadlineConn(self.cfg, client, address, listener.getsockname())
        conn.linger = self._linger
        if not self.gathers:
            self.enqueue_req(conn)
            return
        self.poller.register(client, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
        self._gather(conn)

    def on_client_socket_readable(self, conn: DeadlineConn, client: socket.socket) -> None:
        """A kept-alive connection has the next request's first bytes: gather it like a new one."""
        if not self.gathers:
            super().on_client_socket_readable(conn, client)
            return
        self.keepalived_conns.remove(conn)
        self.poller.modify(client, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
        self._gather(conn)

    def _gather(self, conn: DeadlineConn) -> None:
        conn.deadline = time.monotonic() + self.read_timeout_seconds
        conn.head, conn.searched, conn.need = bytearray(), 0, 0
        self.gathering[conn] = None
        self.on_request_bytes(conn, conn.sock)

    def on_request_bytes(self, conn: DeadlineConn, _sock: socket.socket) -> None:
        data = receive_now(conn.sock)
        if data is None:
            return
        if not data:  # the client left before its request was complete
            self._drop(conn)
            return
        assert conn.head is not None
        conn.head += data
        if not self._request_gathered(conn):
            return
        self.poller.unregister(conn.sock)
        del self.gathering[conn]
        conn.data_ready = True  # gthread must not wait for a first byte again
        self.enqueue_req(conn)

    @staticmethod
    def _request_gathered(conn: DeadlineConn) -> bool:
        head = conn.head
        assert head is not None
        if not conn.need:
            end = head.find(b"\r\n\r\n", conn.searched)
            if end < 0:
                conn.searched = max(0, len(head) - 3)
                return len(head) >= HEAD_LIMIT_BYTES
            conn.need = end + 4 + body_to_gather(bytes(head[:end]))
        return len(head) >= conn.need

    def _drop(self, conn: DeadlineConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.gathering.pop(conn, None)
        self.nr_conns -= 1
        conn.close()

    def _linger(self, conn: DeadlineConn) -> None:
        """Close after the answer like close_graceful (FIN, then read away what still comes), without blocking."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering_bytes, conn))
        except (OSError, ValueError, KeyError):  # already gone (or closed by gunicorn itself)
            util.close(conn.sock)
            return
        self.nr_conns += 1  # gthread counted it out; it still holds a socket until it is really closed
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS

    def _on_lingering_bytes(self, conn: DeadlineConn, _sock: socket.socket) -> None:
        data = receive_now(conn.sock)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn: DeadlineConn) -> None:
        del self.lingering[conn]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        util.close(conn.sock)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.gathering:
            conn = next(iter(self.gathering))
            if conn.deadline is None or conn.deadline > now:
                break
            conn.timed_out = True
            self._drop(conn)
            self._report_timeout(conn)
        while self.lingering:
            conn, until = next(iter(self.lingering.items()))
            if until > now:
                break
            self._end_linger(conn)
        with self._notices_lock:
            for _, quiet in self._notices.overdue():
                log.warning(
                    "closed %d more connections in the last minute that had not sent a whole request "
                    "within REQUEST_READ_TIMEOUT_SECONDS=%gs",
                    quiet,
                    self.read_timeout_seconds,
                )

    def _report_timeout(self, conn: DeadlineConn) -> None:
        SLOW_REQUESTS_CLOSED.inc()
        with self._notices_lock:
            quiet = self._notices.due("slow")
        if quiet is not None:
            log.warning(
                "closed a connection from %s that had not sent a whole request within "
                "REQUEST_READ_TIMEOUT_SECONDS=%gs (later ones are summed up once a minute)"
                + (f" ({quiet} more in the last minute)" if quiet else ""),
                conn.client[0] if isinstance(conn.client, tuple) else conn.client,
                self.read_timeout_seconds,
            )

    # --- a request thread ----------------------------------------------------------------------------

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.wsgi

        def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
            # start_response is gunicorn's Response.start_response: force_close() before the headers go out
            # makes them say "Connection: close", and gthread then neither drains the body nor keeps it alive.
            force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
            if force_close is not None:
                environ[CLOSE_CONNECTION_KEY] = force_close
            return app(environ, start_response)

        self.wsgi = wsgi

    def handle(self, conn: DeadlineConn) -> Any:
        if conn.deadline is None:  # a request read ahead behind the previous one, or not gathered
            conn.deadline = time.monotonic() + self.read_timeout_seconds
        try:
            result = super().handle(conn)
        finally:
            conn.deadline = None
        if result is False and conn.timed_out:  # closed at once by gthread's main thread (DeadlineConn.close)
            self._report_timeout(conn)
        return result
