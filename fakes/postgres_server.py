"""A throwaway PostgreSQL server for the tests and the bench: its own data folder, a free loopback port,
its Unix socket in that folder, gone when stopped.

    server = PostgresServer.start()          # PostgresUnavailable says why when it cannot be had
    url = server.create_database("bench")    # postgresql://postgres@127.0.0.1:PORT/bench
    ...
    server.stop()

It uses the machine's PostgreSQL binaries (Debian's postgresql-NN package: /usr/lib/postgresql/NN/bin,
not on PATH; PG_BIN_DIR picks another folder). PostgreSQL refuses to run as root, so as root the data
folder is given to the `postgres` user and initdb/pg_ctl run under `runuser -u postgres`.
The server trusts loopback connections (no password) and skips fsync (its commits survive a crash of
PostgreSQL, not of the machine): it is for tests, never for data.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fakes.gunicorn_server import free_port

SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and how to get one."""


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL bin folder with initdb and pg_ctl (PG_BIN_DIR first, then Debian's, then PATH)."""
    candidates = [os.environ.get("PG_BIN_DIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if found := shutil.which("pg_ctl"):
        candidates.append(str(Path(found).parent))
    for folder in filter(None, candidates):
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


class PostgresServer:
    def __init__(self, bin_dir: Path, folder: Path, port: int, *, as_user: str | None) -> None:
        self.bin_dir, self.folder, self.port, self.as_user = bin_dir, folder, port, as_user
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.settings: dict[str, str] = {}

    @classmethod
    def start(cls, *, settings: dict[str, str] | None = None, attempts: int = 3) -> PostgresServer:
        """initdb and start a server; `settings` are extra postgres -c options (e.g. {"fsync": "on"})."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed (no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH): "
                "apt-get install postgresql-15, or set PG_BIN_DIR"
            )
        as_user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL") from None
            as_user = SERVER_USER
        folder = Path(tempfile.mkdtemp(prefix="whatsapp-webhook-pg-"))
        server = cls(bin_dir, folder, free_port(), as_user=as_user)
        server.settings = dict(settings or {})
        try:
            if as_user:
                shutil.chown(folder, user=as_user, group=None)
            server._run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync")
            for attempt in range(attempts):
                if attempt:
                    server.port = free_port()
                if server._pg_ctl_start():
                    return server
            raise PostgresUnavailable(f"PostgreSQL did not start:\n{server.log_tail()}")
        except BaseException:
            server.stop()
            raise

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.as_user, "--", *command] if self.as_user else command

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(self._command(tool, *args), capture_output=True, text=True, timeout=120,
                              cwd=self.folder)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{tool} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")

    def _pg_ctl_start(self) -> bool:
        options = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(self.folder),
                   "fsync": "off", "full_page_writes": "off",
                   "max_connections": "300", "shared_buffers": "64MB", **self.settings}
        flags = " ".join(f"-c {name}={value}" for name, value in options.items())
        done = subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", flags,
                                            "-w", "-t", "60", "start"),
                              capture_output=True, text=True, timeout=90, cwd=self.folder)
        return done.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql_execute(self, sql: str, *, database: str = "postgres") -> None:
        """Run statements as the superuser (autocommit: CREATE DATABASE cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            connection.execute(sql.encode())

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self.psql_execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def backend_pid(self) -> int | None:
        """The postmaster's pid (its CPU time is the database's), from the data folder's postmaster.pid."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pause(self) -> None:
        """Stop the server, keeping its data (an outage); resume() starts it again on the same port."""
        subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                       capture_output=True, timeout=60, cwd=self.folder)

    def resume(self) -> None:
        if not self._pg_ctl_start():
            raise PostgresUnavailable(f"PostgreSQL did not start again:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._command("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"),
                           capture_output=True, timeout=60, cwd=self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_until_accepting(url: str, timeout: float = 10.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
