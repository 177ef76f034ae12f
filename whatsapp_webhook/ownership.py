"""One server per SQLite state file, and a clear word when the port is taken.

Restart recovery hands every unfinished message back to the inbox. That is right only for the one
server that owns the state file: a second server started on the same file (by mistake, or to test
a port) would take replies away from the first one, which then answers twice. So recovery runs
only in a server holding an exclusive lock on STATE_DB + ".server.lock", taken after its port is
bound. A lock (flock) dies with the last process holding it, so a server killed with kill -9
never blocks the next start; workers close their copy after the fork so they cannot outlive it.

A PostgreSQL STATE_DB has no file to lock (and servers on several hosts may share it): the claim
is then a no-op.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from whatsapp_webhook.settings import is_postgres_url


class StateFileBusy(Exception):
    """Another live server owns this state file."""


class StateFileOwner:
    """The exclusive claim of one server process on an SQLite state file (never the write gate's lock)."""

    def __init__(self, state_db: str) -> None:
        self.state_db = state_db
        self.path: str | None = None if is_postgres_url(state_db) else state_db + ".server.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the claim or raise StateFileBusy naming the process that has it (nothing to take for PostgreSQL)."""
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateFileBusy(
                f"another server (pid {other}) is using STATE_DB={self.state_db}; stop it first, "
                f"or give this one its own STATE_DB"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def forget_in_child(self) -> None:
        """After fork, in the child: close the inherited copy without unlocking the parent's claim."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def port_in_use_message(host: str, port: int) -> str | None:
    """The one line to print when `host:port` cannot be bound because something listens there, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn and Werkzeug bind
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None  # anything else is for the real bind to report
            return (
                f"port {port} on {host} is already in use (WEBHOOK_PORT={port}): another program listens there; "
                f"find it with `ss -ltnp 'sport = :{port}'` and stop it, or set WEBHOOK_PORT to a free port"
            )
    return None
