"""Loopback benchmark of the WhatsApp webhook server: one command, one table.

    .venv/bin/python -m bench.run_bench                  # full run (~6 min, the seed baseline takes most)
    .venv/bin/python -m bench.run_bench --quick --skip-baseline     # smoke run (< 1 min)

Starts the fake LLM and fake WAHA (fakes/, as their own processes), the server under gunicorn with
the repository's gunicorn.conf.py, a bare Flask app under the same gunicorn settings, and the seed-style
baseline; drives them with wrk (bench/wrk/*.lua); counts replies from the fake WAHA's request log; prints
a Markdown table. See bench/README.md for what each run measures.

Exit status: 0 = figures printed (missed targets are reported, not failed); 1 = a message was not answered
exactly once in run 2, 3 or 5; 2 = the harness itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx

from bench import run3_steps
from fakes import waha_payloads as wp
from fakes.gunicorn_server import GunicornError, GunicornServer, clean_env, last_lines, stop_process
from fakes.postgres_server import PostgresServer, PostgresUnavailable

WEBHOOK_PATH = "/api/v1/whatsapp/webhook"
WAHA_KEY = "bench-waha-key"
LLM_KEY = "bench-llm-key"
TOKEN = re.compile(r"#(\w+-\d{6})")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Settings copied from our server's resolved gunicorn config to the bare app's command line.
SHARED_GUNICORN = (("worker_class", "--worker-class"), ("workers", "--workers"), ("threads", "--threads"),
                   ("keepalive", "--keep-alive"), ("timeout", "--timeout"), ("graceful_timeout", "--graceful-timeout"),
                   ("worker_connections", "--worker-connections"), ("backlog", "--backlog"),
                   ("worker_tmp_dir", "--worker-tmp-dir"))


class HarnessError(Exception):
    """The benchmark could not run (as opposed to: the server missed a target)."""


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------------------------------
# /proc helpers: worker pids, RSS, CPU time
# --------------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from "state" on (state = field 3)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0  # utime + stime


class CpuMeter:
    """CPU seconds used by named processes between start() and stop(): who saturated the cores."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.before: dict[int, float] = {}
        self.started = 0.0
        self.result: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.before = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids()}

    def stop(self, extra: dict[str, float] | None = None) -> None:
        self.wall = time.monotonic() - self.started
        for name, pids in self.groups.items():
            self.result[name] = sum(cpu_seconds(pid) - self.before.get(pid, 0.0) for pid in pids())
        self.result.update(extra or {})

    def summary(self) -> str:
        cores = f"{sum(self.result.values()) / self.wall:.2f} of {os.cpu_count()} cores busy" if self.wall else ""
        parts = [f"{name} {100 * sec / self.wall:.0f}%" for name, sec in self.result.items() if self.wall]
        return f"CPU over {self.wall:.1f}s: " + ", ".join(parts) + f" ({cores}; 100% = one core)"


# --------------------------------------------------------------------------------------------------
# Processes: fakes, gunicorn servers, wrk
# --------------------------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    output: Path

    def tail(self, lines: int = 30) -> str:
        return last_lines(self.output, lines)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 40.0) -> None:
        if stop_process(self.popen, timeout) == -signal.SIGKILL:
            say(f"{self.name} did not stop within {timeout:.0f}s; killed its process group")


class Processes:
    """Everything started (fakes, gunicorns), stopped in reverse order whatever happens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Proc | Gunicorn] = []

    def start(self, name: str, command: list[str], *, env: dict[str, str], cwd: Path = REPO) -> Proc:
        output = self.folder / f"{name}.out"
        with open(output, "ab") as out:
            popen = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, popen, output)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def runtime_dir(home: Path) -> dict[str, str]:
    """XDG_RUNTIME_DIR of its own, so each gunicorn gets its own control socket (gunicorn >= 25)."""
    run_dir = home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(run_dir)}


class Fake:
    """A fake upstream in its own process (`python -m fakes.fake_x`), so it never shares our GIL."""

    def __init__(self, procs: Processes, module: str, name: str, api_key: str, folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.jsonl"
        env = {**clean_env(), **runtime_dir(folder / name)}
        self.proc = procs.start(name, [sys.executable, "-m", module, "--port", "0", "--api-key", api_key,
                                       "--log", str(self.log)], env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if match := re.search(r"listening on (http://\S+)", self.proc.tail(5)):
                self.url = match.group(1)
                self.http = httpx.Client(base_url=self.url, timeout=10)
                return
            if not self.proc.alive():
                break
            time.sleep(0.05)
        raise HarnessError(f"{name} did not start:\n{self.proc.tail()}")

    def configure(self, *, latency: float) -> None:
        self.http.post("/_fake/reset").raise_for_status()
        self.http.post("/_fake/config", json={"latency_s": latency}).raise_for_status()

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


class Gunicorn(GunicornServer):
    """One gunicorn (fakes.gunicorn_server) in folder/NAME, its output in gunicorn.out there; pids from /proc."""

    def __init__(self, procs: Processes, name: str, env: dict[str, str], **launcher: Any) -> None:
        super().__init__(procs.folder / name, {**runtime_dir(procs.folder / name), **env}, **launcher)
        self.name, self.procs = name, procs

    def start(self, **kwargs: Any) -> Gunicorn:
        """Start it, wait until it is ready and every worker is up (run 4 measures each one's memory)."""
        self.procs.started.append(self)
        try:
            super().start(**kwargs)
        except GunicornError as exc:
            raise HarnessError(f"{self.name}: {exc}") from None
        deadline = time.monotonic() + 10
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    @property
    def master(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        return children(self.master)

    def stop(self, timeout: float | None = None) -> int | None:
        code = super().stop(timeout)
        if code == -signal.SIGKILL:
            say(f"{self.name} did not stop within {timeout or self.stop_timeout:.0f}s; killed its process group")
        if self in self.procs.started:
            self.procs.started.remove(self)
        return code


def gunicorn_config(command: list[str], env: dict[str, str]) -> dict[str, str]:
    """The fully resolved settings gunicorn would run with (`--print-config`)."""
    result = subprocess.run([*command[:-1], "--print-config", command[-1]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise HarnessError(f"gunicorn --print-config failed:\n{result.stdout}\n{result.stderr}")
    config = {}
    for line in result.stdout.splitlines():
        if "=" in line:
            name, _, value = line.partition("=")
            config[name.strip()] = value.strip()
    return config


def find_wrk(explicit: str | None) -> str:
    if explicit:
        return explicit
    if found := shutil.which("wrk"):
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("wrk not found; installing the Debian package: apt-get install -y wrk")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "wrk"], env=env).returncode != 0:
            say("apt-get install failed; running apt-get update and trying again")
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(["apt-get", "install", "-y", "wrk"], env=env)
        if found := shutil.which("wrk"):
            return found
    raise HarnessError("the load generator wrk is not installed: install it (Debian/Ubuntu: apt-get install wrk, "
                       "macOS: brew install wrk) or pass --wrk PATH")


def wrk_version(wrk: str) -> str:
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    line = (result.stdout or result.stderr).splitlines()[0] if (result.stdout or result.stderr) else "?"
    return line.split(" [")[0].strip()


@dataclass
class WrkResult:
    data: dict[str, Any]
    raw: str
    cpu: float = 0.0  # CPU seconds wrk used

    @property
    def rps(self) -> float:
        return self.data["requests"] / (self.data["duration_us"] / 1e6)

    @property
    def errors(self) -> int:
        return sum(self.data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))

    def ms(self, name: str) -> float:
        return self.data[name] / 1000


def parse_wrk(raw: str, name: str) -> WrkResult:
    for line in raw.splitlines():
        if line.startswith("WRK_JSON "):
            return WrkResult(json.loads(line[len("WRK_JSON "):]), raw)
    raise HarnessError(f"wrk ({name}) printed no result:\n{raw[-3000:]}")


def run_wrk_fixed(wrk: str, url: str, requests_file: Path, *, seconds: float, threads: int, connections: int,
                  folder: Path, name: str) -> WrkResult:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
               "-s", str(REPO / "bench" / "wrk" / "fixed.lua"), url + WEBHOOK_PATH, "--", str(requests_file)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (folder / f"{name}.wrk.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise HarnessError(f"wrk failed ({name}):\n{result.stdout}\n{result.stderr}")
    parsed = parse_wrk(result.stdout, name)
    parsed.cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return parsed


class WrkOnce:
    """wrk sending every line of a requests file exactly once (bench/wrk/once.lua), stopped with SIGINT."""

    def __init__(self, wrk: str, url: str, requests_file: Path, *, threads: int, connections: int,
                 timeout_s: float, folder: Path, name: str, idle: str = "park") -> None:
        self.name, self.threads = name, threads
        self.marker_dir = folder / f"{name}.markers"
        self.marker_dir.mkdir()
        self.output = folder / f"{name}.wrk.txt"
        command = [wrk, f"-t{threads}", f"-c{connections}", "-d3600s", "--timeout", f"{timeout_s:g}s", "--latency",
                   "-s", str(REPO / "bench" / "wrk" / "once.lua"), url + WEBHOOK_PATH, "--", str(requests_file),
                   str(threads), str(self.marker_dir), idle]
        self._out = open(self.output, "wb")
        self.started_at = time.time()
        self.popen = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def all_sent(self) -> bool:
        """Every thread has handed its last delivery to a connection."""
        return len(list(self.marker_dir.glob("thread-*.sent"))) >= self.threads

    def all_answered(self) -> bool:
        """Every thread has sent its share and has every answer (its marker file exists)."""
        return len(list(self.marker_dir.glob("thread-*.json"))) >= self.threads

    def finish(self) -> WrkResult:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # wrk prints its summary and done() output on SIGINT
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._out.close()
        return parse_wrk(self.output.read_text(errors="replace"), self.name)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._out.close()


# --------------------------------------------------------------------------------------------------
# Load: WAHA deliveries signed in Python (wrk's LuaJIT has no HMAC)
# --------------------------------------------------------------------------------------------------
def _line(body: bytes, key: str, timestamp_ms: int) -> str:
    text = body.decode("utf-8")
    if "\n" in text or "\t" in text:
        raise HarnessError("a request body contains a raw newline or tab; the requests file needs one per line")
    return f"{wp.sign(body, key)}\t{uuid.uuid4().hex}\t{timestamp_ms}\t{text}\n"


def write_ack_file(path: Path, key: str) -> None:
    envelope = wp.message_ack("WEBJS")
    path.write_text(_line(wp.dumps(envelope), key, envelope["timestamp"]), encoding="utf-8")


def chat_id(run: int, n: int) -> str:
    return f"55{run:02d}9{n:07d}@c.us"


def write_messages(path: Path, key: str, *, tag: str, run: int, chats: int, per_chat: int) -> list[str]:
    """chats x per_chat text messages from distinct customers, wave by wave: every chat's 1st message, then
    every chat's 2nd... with increasing payload timestamps inside a chat. Returns the tokens in file order."""
    wp.seed(run)
    base_s = int(time.time()) - 60
    tokens: list[str] = []
    with open(path, "w", encoding="utf-8") as out:
        for k in range(per_chat):
            for c in range(chats):
                index = len(tokens)
                token = f"{tag}-{index:06d}"
                ts_ms = (base_s + k) * 1000 + c % 1000
                envelope = wp.text_message("WEBJS", sender=chat_id(run, c), body=f"Olá, qual o horário de hoje? #{token}",
                                           message_id=f"3EB0{run:02X}{index:016X}", timestamp=base_s + k,
                                           timestamp_ms=ts_ms)
                out.write(_line(wp.dumps(envelope), key, ts_ms))
                tokens.append(token)
    return tokens


def sent_tokens(tokens: list[str], wrk: WrkResult) -> list[str]:
    """Which lines wrk sent: thread k (1-based) of T sent lines k-1, k-1+T, ... (bench/wrk/once.lua)."""
    per_thread = wrk.data.get("threads") or []
    total = len(per_thread)
    sent = []
    for t in per_thread:
        sent.extend(tokens[t["id"] - 1 + i * total] for i in range(t["sent"]))
    return sent


# --------------------------------------------------------------------------------------------------
# Counting replies: the fake WAHA's request log (one JSON line per request)
# --------------------------------------------------------------------------------------------------
class ReplyLog:
    """Follows the fake WAHA's JSONL log from now on and keeps every sendText that carried a bench token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.rest = b""
        self.replies: list[tuple[float, str, int]] = []  # (t_wall arrival, token, status)
        self.answered: dict[str, set[str]] = {}  # tag -> tokens delivered (201) at least once
        self.other_paths: Counter[str] = Counter()

    def poll(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        data = self.rest + chunk
        lines = data.split(b"\n")
        self.rest = lines.pop()
        added = 0
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("path") != "/api/sendText":
                self.other_paths[record.get("path", "?")] += 1
                continue
            body = record.get("body") if isinstance(record.get("body"), dict) else {}
            # One reply may answer several messages (a burst merged by DEBOUNCE_SECONDS): each token counts.
            for token in TOKEN.findall(str(body.get("text", ""))):
                self.replies.append((float(record["t_wall"]), token, record.get("status")))
                if record.get("status") == 201:
                    self.answered.setdefault(token.split("-")[0], set()).add(token)
                added += 1
        return added

    def distinct(self, tag: str) -> int:
        return len(self.answered.get(tag, ()))

    def delivered(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, tok) for t, tok, status in self.replies if status == 201 and tok.startswith(prefix)]

    def failed_sends(self, prefix: str) -> int:
        return sum(1 for _, tok, status in self.replies if status != 201 and tok.startswith(prefix))


@dataclass
class OnceCheck:
    sent: int
    answered_once: int
    duplicates: int
    missing: int
    unexpected: int

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.duplicates == 0 and self.missing == 0 and self.unexpected == 0

    def text(self) -> str:
        return (f"{self.sent:,} sent, {self.answered_once:,} answered once, {self.duplicates} duplicated, "
                f"{self.missing} unanswered, {self.unexpected} unexpected")


def check_once(sent: Iterable[str], delivered: list[tuple[float, str]]) -> OnceCheck:
    sent_set = set(sent)
    counts = Counter(tok for _, tok in delivered)
    return OnceCheck(sent=len(sent_set), answered_once=sum(1 for t in sent_set if counts.get(t) == 1),
                     duplicates=sum(1 for t, n in counts.items() if n > 1),
                     missing=sum(1 for t in sent_set if t not in counts),
                     unexpected=sum(1 for t in counts if t not in sent_set))


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reply_delays(posted: dict[str, float], delivered: Iterable[tuple[float, str]], *,
                 window_s: float = 0.0) -> dict[str, float]:
    """token -> seconds from its POST's start, plus `window_s` (a debounce window), to the first accepted
    sendText that carried the token (its arrival at the fake WAHA). Tokens not posted are ignored; posted
    tokens without a reply are left out (check_once counts them)."""
    first: dict[str, float] = {}
    for arrived, token in delivered:
        if token in posted and arrived < first.get(token, float("inf")):
            first[token] = arrived
    return {token: first[token] - posted[token] - window_s for token in posted if token in first}


@dataclass
class OnceRun:
    """One pass of once.lua plus the replies it caused."""

    wrk: WrkResult
    t0: float
    all_sent_at: float | None  # every delivery handed to a connection
    all_answered_at: float | None  # every delivery has its HTTP answer
    delivered: list[tuple[float, str]]
    check: OnceCheck
    failed_sends: int
    stalled: bool
    wrk_cpu: float  # CPU seconds wrk used (from its rusage when reaped)

    @property
    def last_reply(self) -> float:
        return max(t for t, _ in self.delivered) if self.delivered else float("nan")


def drive_once(wrk_bin: str, url: str, requests_file: Path, tokens: list[str], replies: ReplyLog, *, tag: str,
               threads: int, connections: int, request_timeout: float, stall_s: float, drain_s: float,
               folder: Path, name: str, on_tick: Callable[[], None] | None = None, idle: str = "park") -> OnceRun:
    """Send every line once. wrk is stopped (SIGINT) as soon as every delivery has its HTTP answer, so its
    figures cover the deliveries only; then wait until every message is answered at the fake WAHA (or
    nothing moves for stall_s), and keep watching drain_s more for late duplicates."""
    expected = len(tokens)
    runner = WrkOnce(wrk_bin, url, requests_file, threads=threads, connections=connections,
                     timeout_s=request_timeout, folder=folder, name=name, idle=idle)
    t0 = runner.started_at
    all_answered_at = None
    all_sent_at = None
    result: WrkResult | None = None
    wrk_cpu = 0.0
    last_progress = time.monotonic()
    seen = 0
    stalled = False

    def stop_wrk() -> None:
        nonlocal result, wrk_cpu
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = runner.finish()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    try:
        while True:
            replies.poll()
            if on_tick:
                on_tick()
            if all_sent_at is None and runner.all_sent():
                all_sent_at = time.time()
            if result is None and runner.all_answered():
                all_answered_at = time.time()
                last_progress = time.monotonic()
                stop_wrk()
            done = replies.distinct(tag)
            if done != seen:
                seen = done
                last_progress = time.monotonic()
            if done >= expected and result is not None:
                break
            if result is None and runner.popen.poll() is not None:
                raise HarnessError(f"wrk exited early ({name}):\n{runner.output.read_text(errors='replace')[-2000:]}")
            if time.monotonic() - last_progress > stall_s:
                stalled = True
                say(f"{name}: no progress for {stall_s:.0f}s ({done}/{expected} answered"
                    f"{'' if result else ', deliveries still unanswered'}); giving up waiting")
                break
            time.sleep(0.02)
        if result is None:
            stop_wrk()
    except BaseException:
        runner.kill()
        raise
    time.sleep(drain_s)  # a late second copy would show up here
    replies.poll()
    delivered = replies.delivered(tag)
    assert result is not None
    check = check_once(sent_tokens(tokens, result), delivered)
    return OnceRun(result, t0, all_sent_at, all_answered_at, delivered, check, replies.failed_sends(tag), stalled,
                   wrk_cpu)


# --------------------------------------------------------------------------------------------------
# Run 3's floor: a "perfect server" (no inbox, no framework) calling the same fakes with the same shape
# --------------------------------------------------------------------------------------------------
async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str,
                headers: dict[str, str], body: bytes) -> int:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    writer.write(head.encode("latin-1") + body)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


def server_arrivals(state_db: str, tag: str, chats: int, t0: float) -> dict[tuple[int, int], float]:
    """When our server recorded each message of a run (its inbox's received_at, wall time), as (chat, k) ->
    seconds after `t0` (when wrk started): the arrival pattern the run really had, which the floor replays."""
    token = re.compile(rf"#{re.escape(tag)}-(\d+)")
    if state_db.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(state_db) as connection:
            rows = connection.execute("SELECT message, received_at FROM inbox").fetchall()
    else:
        with sqlite3.connect(state_db) as connection:
            rows = connection.execute("SELECT message, received_at FROM inbox").fetchall()
    found: dict[tuple[int, int], float] = {}
    for message, received_at in rows:
        if message and (match := token.search(message if isinstance(message, str) else json.dumps(message))):
            index = int(match.group(1))
            found[(index % chats, index // chats)] = float(received_at)  # write_messages: wave by wave
    return {where: max(0.0, at - t0) for where, at in found.items()}


async def _floor(llm_url: str, waha_url: str, chats: int, per_chat: int,
                 arrivals: dict[tuple[int, int], float] | None = None) -> tuple[float, int]:
    """A perfect server on keep-alive connections, one pair per chat: LLM call, then sendText, per_chat times
    in order. With `arrivals` ((chat, k) -> seconds), each message starts no earlier than it reached our server
    in the run measured; without, every chat starts at once."""
    llm, waha = httpx.URL(llm_url), httpx.URL(waha_url)
    llm_body = json.dumps({"model": "google/gemini-3.1-flash-lite",
                           "messages": [{"role": "user", "content": "floor"}]}).encode()
    failures = 0

    async def chat(i: int) -> float:
        nonlocal failures
        lr, lw = await asyncio.open_connection(llm.host, llm.port)
        wr, ww = await asyncio.open_connection(waha.host, waha.port)
        try:
            for k in range(per_chat):
                if arrivals is not None and (wait := started + arrivals.get((i, k), 0.0) - time.time()) > 0:
                    await asyncio.sleep(wait)
                status = await _post(lr, lw, llm.host, "/api/v1/chat/completions", {"Authorization": f"Bearer {LLM_KEY}"},
                                     llm_body)
                body = json.dumps({"session": "default", "chatId": chat_id(8, i), "text": "floor"}).encode()
                status2 = await _post(wr, ww, waha.host, "/api/sendText", {"X-Api-Key": WAHA_KEY}, body)
                failures += (status != 200) + (status2 != 201)
            return time.time()
        finally:
            lw.close()
            ww.close()

    started = time.time()
    ends = await asyncio.gather(*(chat(i) for i in range(chats)))
    return max(ends) - started, failures


class PgConnections:
    """Peak connections per worker (application_name whatsapp_webhook:<pid>), polled from pg_stat_activity."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peaks: dict[str, list[int]] = {}  # application_name -> [open, busy]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _poll(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            while not self._stop.wait(0.25):
                for name, opened, busy in connection.execute(
                        "SELECT application_name, COUNT(*), COUNT(*) FILTER (WHERE state = 'active')"
                        " FROM pg_stat_activity WHERE application_name LIKE 'whatsapp\\_webhook:%' GROUP BY 1"):
                    peak = self.peaks.setdefault(name, [0, 0])
                    peak[0], peak[1] = max(peak[0], opened), max(peak[1], busy)

    def text(self, workers: int) -> str:
        shown = " / ".join(f"{opened} open, {busy} busy" for opened, busy in self.peaks.values()) or "none seen"
        return f"{shown} ({len(self.peaks)} pools seen, {workers} workers; STATE_DB_POOL_SIZE default 10)"


# --------------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------------
@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # run, measure, value, target, verdict
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    once_violations: list[str] = field(default_factory=list)

    def row(self, run: str, measure: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append((run, measure, value, target, verdict))


def since(moment: float | None, t0: float) -> str:
    return f"{moment - t0:.2f} s" if moment else "never"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def machine_description(wrk_bin: str) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "cpus": f"{len(os.sched_getaffinity(0))} usable ({os.cpu_count()} online), {model}",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "software": (f"Python {platform.python_version()}, gunicorn {version('gunicorn')}, Flask {version('flask')}, "
                     f"Werkzeug {version('werkzeug')}, httpx {version('httpx')}, {wrk_version(wrk_bin)}"),
        "load": "load average before start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "note": "load generator, fakes and servers share these CPUs over loopback",
    }


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.procs = Processes(folder)
        self.results = Results()
        self.hmac_key = secrets.token_hex(32)
        self.wrk = ""
        self.llm: Fake | None = None
        self.waha: Fake | None = None
        self.server_config: dict[str, str] = {}
        self.repetition = ""  # "-2", "-3"... in file names when runs 2 and 3 are repeated
        self.store = "sqlite"  # the store runs 2 and 3 are on now (--store both runs them on each)
        self.pg: PostgresServer | None = None

    def lab(self, run: str) -> str:
        """A run's label in the table: "2", or "2 pg" for the same run on PostgreSQL."""
        return run + (" pg" if self.store == "postgresql" else "")

    def key(self, name: str) -> str:
        return name + ("_pg" if self.store == "postgresql" else "")

    # -- starting things -------------------------------------------------------------------------
    def server_env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Our server's settings; fakes.gunicorn_server adds a fresh STATE_DB and an empty WEBHOOK_ENV_FILE.
        `extra`: what a run fixes by definition (run 5's DEBOUNCE_SECONDS), over everything else."""
        assert self.llm and self.waha
        return {"LOG_FILE": "", "LOG_LEVEL": self.args.log_level, "TYPING_SIMULATION": "false",
                "WEBHOOK_HMAC_KEY": self.hmac_key,
                "WAHA_BASE_URL": self.waha.url, "WAHA_API_KEY": WAHA_KEY,
                "OPENROUTER_BASE_URL": self.llm.url + "/api/v1", "OPENROUTER_API_KEY": LLM_KEY,
                "GUNICORN_THREADS": str(self.args.threads),
                # The engine, not the anti-abuse policy, is measured: per-chat limits would silence runs 2-3
                # by design, and a debounce window is waiting on purpose (see --debounce-seconds).
                "DEBOUNCE_SECONDS": f"{self.args.debounce_seconds:g}",
                "RATE_LIMIT_PER_MINUTE": "100000", "DAILY_MESSAGE_LIMIT": "1000000",
                "PROMETHEUS_MULTIPROC_DIR": str(self.folder / name / "metrics"),
                **self.state_env(name),
                **dict(item.split("=", 1) for item in self.args.server_env),
                **(extra or {})}

    def state_env(self, name: str) -> dict[str, str]:
        """On PostgreSQL: a fresh database of the bench's server (SQLite: the launcher's fresh file)."""
        if self.store != "postgresql":
            return {}
        assert self.pg is not None
        return {"STATE_DB": self.pg.create_database(re.sub(r"\W", "_", name))}

    def start_server(self, name: str, extra_env: dict[str, str] | None = None) -> Gunicorn:
        server = Gunicorn(self.procs, name, self.server_env(name, extra_env), workers=self.args.workers,
                          app=self.args.server_app)
        if not self.server_config:
            self.server_config = gunicorn_config(server.command, server.env)
        say(f"starting our server ({name}): {' '.join(server.command[2:])}")
        server.start()
        say(f"  master pid {server.master}, workers {server.worker_pids()}")
        return server

    def start_hello(self) -> Gunicorn:
        flags: list[str] = []
        for setting, flag in SHARED_GUNICORN:
            value = self.server_config.get(setting)
            if setting != "workers" and value not in (None, "", "None"):  # workers: the launcher's -w
                flags += [flag, value]
        body = (self.folder / "ack.txt").read_text().split("\t")[3].encode()
        hello = Gunicorn(self.procs, "hello", {}, workers=int(self.server_config.get("workers") or 1),
                         app="bench.hello_app:app", config="/dev/null",
                         options=[*flags, "--log-level", "warning", "--error-logfile", "-"],
                         ready=lambda http: http.post(WEBHOOK_PATH, content=body,
                                                      headers={"Content-Type": "application/json"}).status_code == 200)
        say(f"starting the bare Flask app: gunicorn {' '.join(hello.command[5:])}")
        hello.start()
        self.results.data["hello_command"] = "gunicorn " + " ".join(hello.command[5:])
        return hello

    def start_seed(self) -> Gunicorn:
        assert self.llm and self.waha
        env = {"SEED_LLM_URL": self.llm.url + "/api/v1", "SEED_LLM_KEY": LLM_KEY,
               "SEED_WAHA_URL": self.waha.url, "SEED_WAHA_KEY": WAHA_KEY}
        seed = Gunicorn(self.procs, "seed", env, workers=4, app="bench.seed_baseline:app", config="/dev/null",
                        options=["--worker-class", "sync", "--log-level", "warning", "--error-logfile", "-"])
        say(f"starting the seed-style baseline: gunicorn {' '.join(seed.command[5:])}")
        return seed.start()

    def cpu_meter(self, server: Gunicorn) -> CpuMeter:
        assert self.llm and self.waha
        groups = {"server workers": server.worker_pids, "server master": lambda: [server.master],
                  "fake LLM": lambda: [self.llm.pid], "fake WAHA": lambda: [self.waha.pid],
                  "bench": lambda: [os.getpid()]}
        if self.store == "postgresql" and self.pg is not None and (postmaster := self.pg.backend_pid()):
            groups["PostgreSQL"] = lambda: [postmaster, *children(postmaster)]
        return CpuMeter(groups)

    # -- run 1 -----------------------------------------------------------------------------------
    def run1(self, server: Gunicorn, hello: Gunicorn) -> None:
        a = self.args
        say(f"run 1: signed message.ack, wrk -t2 -c64 -d{a.run1_seconds:g}s, {a.run1_reps} alternating pair(s)")
        ours, bare = [], []
        meter = self.cpu_meter(server)
        for rep in range(a.run1_reps):
            for label, target, bucket in (("ours", server, ours), ("hello", hello, bare)):
                if label == "ours" and rep == 0:
                    meter.start()
                result = run_wrk_fixed(self.wrk, target.url, self.folder / "ack.txt", seconds=a.run1_seconds,
                                       threads=2, connections=64, folder=self.folder, name=f"run1-{label}-{rep + 1}")
                if label == "ours" and rep == 0:
                    meter.stop({"wrk": result.cpu})
                if result.data["status_errors"] or result.errors:
                    self.results.notes.append(
                        f"run 1 {label} #{rep + 1}: {result.data['status_errors']} non-2xx, {result.errors} socket errors")
                bucket.append(result)
                say(f"  {label} #{rep + 1}: {result.rps:,.0f} req/s, p50 {result.ms('p50_us'):.1f} ms, "
                    f"p99 {result.ms('p99_us'):.1f} ms")
        say("  " + meter.summary() + " (first 'ours' pass)")

        def med(results: list[WrkResult], fn: Callable[[WrkResult], float]) -> float:
            return statistics.median(fn(r) for r in results)

        o_rps, h_rps = med(ours, lambda r: r.rps), med(bare, lambda r: r.rps)
        ratio = o_rps / h_rps if h_rps else 0.0
        n = f"median of {len(ours)}" if len(ours) > 1 else "1 run"
        r = self.results
        r.row("1", f"Ignored `message.ack`: our server, req/s ({n}, each {a.run1_seconds:g} s)", f"{o_rps:,.0f}")
        r.row("1", "Ignored `message.ack`: bare Flask hello app, req/s (same gunicorn settings)", f"{h_rps:,.0f}")
        r.row("1", "Our throughput / bare app's", f"{100 * ratio:.1f} %", "≥ 75 %", verdict(ratio >= 0.75))
        r.row("1", "Latency p50 / p99, ours",
              f"{med(ours, lambda x: x.ms('p50_us')):.1f} / {med(ours, lambda x: x.ms('p99_us')):.1f} ms")
        r.row("1", "Latency p50 / p99, bare app",
              f"{med(bare, lambda x: x.ms('p50_us')):.1f} / {med(bare, lambda x: x.ms('p99_us')):.1f} ms")
        r.data["run1"] = {"ours": [x.data for x in ours], "hello": [x.data for x in bare],
                          "ours_rps_median": o_rps, "hello_rps_median": h_rps, "ratio": ratio,
                          "cpu": meter.result, "cpu_wall": meter.wall}
        r.notes.append("Run 1 CPU (first pass of ours): " + meter.summary())

    # -- run 2 -----------------------------------------------------------------------------------
    def run2(self, server: Gunicorn) -> float:
        a = self.args
        assert self.llm and self.waha
        self.llm.configure(latency=0.0)
        self.waha.configure(latency=0.0)
        chats = min(a.run2_chats, a.run2_messages)
        per_chat = max(1, a.run2_messages // chats)
        requests_file = self.folder / f"run2{self.repetition}.txt"
        tokens = write_messages(requests_file, self.hmac_key, tag="r2", run=2, chats=chats, per_chat=per_chat)
        say(f"run 2: {len(tokens):,} unique signed messages from {chats} chats, fakes at 0 ms, "
            f"wrk -t2 -c{a.run2_connections}")
        replies = ReplyLog(self.waha.log)
        meter = self.cpu_meter(server)
        meter.start()
        run = drive_once(self.wrk, server.url, requests_file, tokens, replies, tag="r2", threads=2,
                         connections=a.run2_connections, request_timeout=60, stall_s=a.stall_seconds,
                         drain_s=a.drain_seconds, folder=self.folder, name=f"run2{self.repetition}")
        meter.stop({"wrk": run.wrk_cpu})
        elapsed = run.last_reply - run.t0
        rate = len({tok for _, tok in run.delivered}) / elapsed if elapsed > 0 else 0.0
        ingest = (run.all_sent_at - run.t0) if run.all_sent_at else float("nan")
        say(f"  {run.check.text()}; last reply after {elapsed:.2f}s -> {rate:,.0f} messages/s; "
            f"last delivery sent after {ingest:.2f}s")
        say("  " + meter.summary())
        r = self.results
        r.row(self.lab("2"), f"Processed messages/s, fakes at 0 ms ({len(tokens):,} msgs / {chats} chats, first send → last reply)",
              f"{rate:,.0f}", "≥ 300", verdict(rate >= 300))
        self.webhook_row(self.lab("2"), run)
        self.once_row(self.lab("2"), run)
        cpu_per_message = (meter.result.get("server workers", 0.0) + meter.result.get("server master", 0.0)) / max(1, len(tokens))
        cpu_target = self.store == "sqlite"  # issue 21: ≤ 2.5 ms on SQLite; PostgreSQL is reported beside it
        r.row(self.lab("2"), "Server CPU per processed message (workers' CPU seconds / messages)",
              f"{cpu_per_message * 1000:.1f} ms", "≤ 2.5 ms" if cpu_target else "",
              verdict(cpu_per_message <= 0.0025) if cpu_target else "")
        r.data[self.key("run2")] = {"messages": len(tokens), "chats": chats, "elapsed_s": elapsed, "rate": rate,
                          "cpu_per_message_s": cpu_per_message,
                          "all_sent_s": ingest, "wrk": run.wrk.data, "check": run.check.__dict__,
                          "cpu": meter.result, "cpu_wall": meter.wall}
        r.notes.append("Run 2 CPU: " + meter.summary())
        return rate

    def webhook_row(self, label: str, run: Any) -> None:
        """How the webhook itself fared during a run: when sending ended, when answering ended, latency, statuses."""
        statuses: Counter[str] = Counter()
        for t in run.wrk.data.get("threads", []):
            statuses.update({"200": t["s200"], "202": t["s202"], "other": t["other"]})
        self.results.row(label, f"Webhook during run {label}: last delivery sent / answered after; latency p50 / p99",
                         f"{since(run.all_sent_at, run.t0)} / {since(run.all_answered_at, run.t0)}; "
                         f"{run.wrk.ms('p50_us'):.0f} / {run.wrk.ms('p99_us'):,.0f} ms "
                         f"({statuses['200']} × 200, {statuses['202']} × 202, {statuses['other']} other)")

    def once_row(self, run_name: str, run: OnceRun) -> None:
        extra = []
        if run.failed_sends:
            extra.append(f"{run.failed_sends} sendText attempts not accepted by the fake")
        unanswered = sum(t["sent"] - t["answered"] for t in run.wrk.data.get("threads", []))
        if unanswered:
            extra.append(f"{unanswered} deliveries got no HTTP answer (wrk: {run.wrk.data['timeouts']} timeouts, "
                         f"{run.wrk.errors - run.wrk.data['timeouts']} socket errors)")
        if run.stalled:
            extra.append("stopped waiting: no progress")
        value = run.check.text() + (f" ({'; '.join(extra)})" if extra else "")
        self.results.row(run_name, "Every message answered exactly once (fake WAHA log)", value,
                         "all exactly once", "PASS" if run.check.ok else "FAIL")
        if not run.check.ok:
            self.results.once_violations.append(f"run {run_name}: {run.check.text()}")

    # -- run 3 + memory --------------------------------------------------------------------------
    def warm_up(self, server: Gunicorn, replies: ReplyLog, count: int = 20) -> None:
        """A few messages through the whole path (all at once: each request may wait for its reply)."""
        wp.seed(9)
        bodies = [wp.dumps(wp.text_message("WEBJS", sender=chat_id(9, i), body=f"warm-up #w-{i:06d}",
                                           message_id=f"3EB009{i:016X}")) for i in range(count)]

        def post(body: bytes) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                http.post(WEBHOOK_PATH, content=body, headers={
                    "Content-Type": "application/json", "X-Webhook-Hmac": wp.sign(body, self.hmac_key),
                    "X-Webhook-Hmac-Algorithm": "sha512"})

        senders = [threading.Thread(target=post, args=(body,)) for body in bodies]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 30
        while replies.distinct("w") < count and time.monotonic() < deadline:
            replies.poll()
            time.sleep(0.05)
        for sender in senders:
            sender.join(30)
        if replies.distinct("w") < count:
            raise HarnessError(f"warm-up: only {replies.distinct('w')} of {count} messages answered within 30 s")

    def run3(self, server: Gunicorn) -> float | None:
        a = self.args
        assert self.llm and self.waha
        self.llm.configure(latency=a.llm_latency)
        self.waha.configure(latency=a.waha_latency)
        replies = ReplyLog(self.waha.log)
        start_rss = {pid: rss_mb(pid) for pid in server.worker_pids()}
        self.warm_up(server, replies)
        time.sleep(1.0)
        rest = {pid: rss_mb(pid) for pid in server.worker_pids()}
        requests_file = self.folder / f"run3{self.repetition}.txt"
        tokens = write_messages(requests_file, self.hmac_key, tag="r3", run=3, chats=a.run3_chats,
                                per_chat=a.run3_per_chat)
        per_message = a.llm_latency + a.waha_latency
        ideal = a.run3_per_chat * per_message
        floor = None
        say(f"run 3: {len(tokens):,} messages from {a.run3_chats} chats ({a.run3_per_chat} each), fake LLM "
            f"{a.llm_latency:g} s, fake WAHA {a.waha_latency * 1000:g} ms, wrk -t2 -c{a.run3_connections}; "
            f"ideal {ideal:.2f} s")
        peak: dict[int, float] = dict(rest)
        master_peak = [rss_mb(server.master) or 0.0]
        last_sample = [0.0]

        def sample() -> None:
            now = time.monotonic()
            if now - last_sample[0] < 0.1:
                return
            last_sample[0] = now
            for pid in server.worker_pids():
                if (value := rss_mb(pid)) is not None:
                    peak[pid] = max(peak.get(pid, 0.0), value)
            master_peak[0] = max(master_peak[0], rss_mb(server.master) or 0.0)

        stop_sampling = threading.Event()

        def sampler() -> None:  # every 100 ms, also while the main thread sleeps
            while not stop_sampling.is_set():
                sample()
                stop_sampling.wait(0.1)

        sampler_thread = threading.Thread(target=sampler, daemon=True)
        sampler_thread.start()
        meter = self.cpu_meter(server)
        meter.start()
        try:
            run = drive_once(self.wrk, server.url, requests_file, tokens, replies, tag="r3", threads=2,
                             connections=a.run3_connections, request_timeout=60, stall_s=a.stall_seconds,
                             drain_s=a.drain_seconds, folder=self.folder, name=f"run3{self.repetition}")
        finally:
            stop_sampling.set()
            sampler_thread.join()
        meter.stop({"wrk": run.wrk_cpu})
        took = run.last_reply + a.waha_latency - run.t0  # the fake answers sendText after its latency
        ratio = took / ideal
        arrivals: dict[tuple[int, int], float] = {}
        if not a.skip_floor:
            # The same messages replayed by a perfect server (no inbox, no framework) at the moments they
            # reached ours in this run: what is left between the two is our server's own cost.
            time.sleep(1.0)
            arrivals = server_arrivals(server.env["STATE_DB"], "r3", a.run3_chats, run.t0)
            floor, failures = asyncio.run(
                _floor(self.llm.url, self.waha.url, a.run3_chats, a.run3_per_chat, arrivals=arrivals))
            say(f"run 3 floor: a perfect server (bench-process asyncio client, no inbox, {len(arrivals)} arrivals "
                f"replayed as our server saw them) needs {floor:.2f} s = {floor / ideal:.2f}x ideal "
                f"({failures} failed calls)")
        say(f"  {run.check.text()}; last reply after {took:.2f}s = {ratio:.2f}x ideal")
        say("  " + meter.summary())
        steps = self.run3_steps(run.t0, arrivals) if arrivals else {}
        if steps:
            say("  per chat, p50 / p90: " + "; ".join(f"{name} {p50:.0f} / {p90:.0f} ms"
                                                      for name, (p50, p90) in steps.items()))
        r = self.results
        r.row(self.lab("3"), f"Time until the last reply reaches the fake WAHA ({len(tokens):,} msgs / {a.run3_chats} chats)",
              f"{took:.2f} s")
        r.row(self.lab("3"), f"… ratio to ideal ({a.run3_per_chat} msgs/chat × {per_message:.2f} s = {ideal:.2f} s)",
              f"{ratio:.2f}×", "≤ 1.3×", verdict(ratio <= 1.3))
        if floor is not None:
            r.row(self.lab("3"), "… floor: a perfect server calling the same fakes at the same arrivals (asyncio "
                       "client, no inbox); ours / floor", f"{floor:.2f} s = {floor / ideal:.2f}× ideal",
                  f"ours {took / floor:.2f}× floor (target ≤ 1.15×)", verdict(took / floor <= 1.15))
        if steps:
            r.row(self.lab("3"), "… per chat, p50 / p90 of each step (a perfect server: ~0 ms; bench/run3_steps.py)",
                  "; ".join(f"{name}: {p50:.0f} / {p90:.0f} ms" for name, (p50, p90) in steps.items()))
        self.webhook_row(self.lab("3"), run)
        self.once_row(self.lab("3"), run)

        def fmt(values: dict[int, float | None]) -> str:
            return " / ".join(f"{v:.0f}" for v in values.values() if v is not None) + " MB"

        r.row(self.lab("4"), f"RSS per worker at rest (after start: {fmt(start_rss)}; after warm-up)", fmt(rest),
              "< 100 MB", verdict(all(v is not None and v < 100 for v in rest.values())))
        r.row(self.lab("4"), "RSS per worker, peak during run 3 (sampled every 100 ms)", fmt(peak), "< 100 MB",
              verdict(all(v < 100 for v in peak.values())))
        r.notes.append(f"gunicorn master RSS peak during run 3: {master_peak[0]:.0f} MB (not a worker)")
        r.notes.append("Run 3 CPU: " + meter.summary())
        r.data[self.key("run3")] = {"messages": len(tokens), "took_s": took, "ideal_s": ideal, "ratio": ratio,
                          "floor_s": floor, "wrk": run.wrk.data, "check": run.check.__dict__, "rss_start": start_rss,
                          "rss_rest": rest, "rss_peak": peak, "cpu": meter.result, "cpu_wall": meter.wall,
                          "steps_ms": {name: {"p50": p50, "p90": p90} for name, (p50, p90) in steps.items()}}
        return took

    def run3_steps(self, t0: float, arrivals: dict[tuple[int, int], float]) -> dict[str, tuple[float, float]]:
        """p50 and p90 (ms) of each step of run 3's replies, chat by chat (bench/run3_steps.py)."""
        a = self.args
        assert self.llm and self.waha
        llm, sends = run3_steps.first_calls([*run3_steps.read_log(self.llm.log), *run3_steps.read_log(self.waha.log)],
                                            tag="r3", since=t0)
        steps = run3_steps.per_chat_steps(arrivals, llm, sends, t0=t0, chats=a.run3_chats, per_chat=a.run3_per_chat,
                                          llm_latency=a.llm_latency, waha_latency=a.waha_latency)
        return {name: (percentile(values, 50), percentile(values, 90)) for name, values in steps.items() if values}

    # -- run 5: single-message overhead ----------------------------------------------------------
    def single_messages(self, server: Gunicorn, *, tag: str, count: int, window_s: float) -> dict[str, Any]:
        """`count` signed text messages, each from its own chat, strictly one at a time: the next POST starts
        only when the fake WAHA has logged the previous one's sendText. Each delay is taken from the POST's
        start (bench clock) to that sendText's arrival (the fake's `t_wall`, taken when it has read the request;
        same machine, same wall clock), minus `window_s`."""
        assert self.llm and self.waha
        self.llm.configure(latency=0.0)
        self.waha.configure(latency=0.0)
        replies = ReplyLog(self.waha.log)
        self.warm_up(server, replies, count=5)  # first connections to the fakes are not what is measured
        wp.seed(5)
        posted: dict[str, float] = {}
        statuses: Counter[int] = Counter()
        wait_s = window_s + 10.0
        with httpx.Client(base_url=server.url, timeout=wait_s + 30) as http:  # one keep-alive connection, as WAHA
            for index in range(count):
                token = f"{tag}-{index:06d}"
                body = wp.dumps(wp.text_message("WEBJS", sender=chat_id(5, index), body=f"Oi, tudo bem? #{token}",
                                                message_id=f"3EB005{tag.encode().hex().upper()}{index:010X}"))
                headers = {"Content-Type": "application/json", "X-Webhook-Hmac": wp.sign(body, self.hmac_key),
                           "X-Webhook-Hmac-Algorithm": "sha512", "X-Webhook-Request-Id": uuid.uuid4().hex,
                           "X-Webhook-Timestamp": str(int(time.time() * 1000))}
                posted[token] = time.time()
                statuses[http.post(WEBHOOK_PATH, content=body, headers=headers).status_code] += 1
                deadline = time.monotonic() + wait_s
                while replies.distinct(tag) <= index and time.monotonic() < deadline:
                    replies.poll()
                    time.sleep(0.0005)
                if replies.distinct(tag) <= index:
                    say(f"  {token}: no sendText within {wait_s:.0f} s of its POST; going on")
        time.sleep(min(self.args.drain_seconds, 1.0))  # a late second copy would show up here
        replies.poll()
        delivered = replies.delivered(tag)
        delays = reply_delays(posted, delivered, window_s=window_s)
        ms = [1000 * d for d in delays.values()]
        return {"messages": count, "window_s": window_s, "statuses": dict(statuses),
                "p50_ms": percentile(ms, 50) if ms else None, "p99_ms": percentile(ms, 99) if ms else None,
                "min_ms": min(ms, default=None), "max_ms": max(ms, default=None), "delays_ms": ms,
                "check": check_once(posted, delivered), "failed_sends": replies.failed_sends(tag)}

    def run5_rows(self, label: str, key: str, data: dict[str, Any]) -> None:
        r = self.results
        check: OnceCheck = data.pop("check")
        value = check.text() + (f" ({data['failed_sends']} sendText attempts not accepted by the fake)"
                                if data["failed_sends"] else "")
        r.row(label, "Every message answered exactly once (fake WAHA log)", value, "all exactly once",
              "PASS" if check.ok else "FAIL")
        if not check.ok:
            r.once_violations.append(f"run {label}: {check.text()}")
        data["check"] = check.__dict__
        r.data[key] = data

    def run5a(self, server: Gunicorn) -> float | None:
        a = self.args
        say(f"run 5a: {a.run5_messages} single messages, one at a time, each from its own chat, fakes at 0 ms, "
            "DEBOUNCE_SECONDS=0")
        data = self.single_messages(server, tag="o5a", count=a.run5_messages, window_s=0.0)
        p50, p99 = data["p50_ms"], data["p99_ms"]
        shown = f"{p50:.1f} / {p99:.1f} ms" if p50 is not None else "no reply"
        say(f"  POST → sendText at the fake WAHA: p50 / p99 {shown} (HTTP {data['statuses']})")
        self.results.row(self.lab("5a"), f"Single message, debounce off: POST start → its sendText reaching the "
                         f"fake WAHA, p50 / p99 ({a.run5_messages} msgs one at a time, own chat each, fakes at 0 ms)",
                         shown, "< 10 ms p50", verdict(p50 is not None and p50 < 10))
        self.run5_rows(self.lab("5a"), self.key("run5a"), data)
        return p50

    def run5b(self, server: Gunicorn) -> float | None:
        a = self.args
        window = a.run5_debounce
        say(f"run 5b: {a.run5_debounce_messages} single messages, one at a time, DEBOUNCE_SECONDS={window:g}")
        data = self.single_messages(server, tag="o5b", count=a.run5_debounce_messages, window_s=window)
        p50, p99 = data["p50_ms"], data["p99_ms"]
        shown = f"{p50:.0f} / {p99:.0f} ms" if p50 is not None else "no reply"
        say(f"  sendText at the fake WAHA after the window closed: p50 / p99 {shown} (HTTP {data['statuses']})")
        self.results.row(self.lab("5b"), f"Debounce on (DEBOUNCE_SECONDS={window:g}): the reply reaches the fake "
                         "WAHA this long after the window (sendText arrival − POST start − window), p50 / p99 "
                         f"({a.run5_debounce_messages} msgs one at a time)",
                         shown, "≤ 100 ms after the window (p50)", verdict(p50 is not None and p50 <= 100))
        self.run5_rows(self.lab("5b"), self.key("run5b"), data)
        return p50

    # -- seed baseline ---------------------------------------------------------------------------
    def baseline(self, our_time: float | None) -> None:
        a = self.args
        assert self.llm and self.waha
        self.llm.configure(latency=a.llm_latency)
        self.waha.configure(latency=a.waha_latency)
        full = a.run3_chats * a.run3_per_chat
        n = min(a.baseline_messages, full)
        chats = max(1, n // a.run3_per_chat)
        requests_file = self.folder / "seed.txt"
        tokens = write_messages(requests_file, self.hmac_key, tag="sb", run=4, chats=chats, per_chat=a.run3_per_chat)
        seed = self.start_seed()
        replies = ReplyLog(self.waha.log)
        say(f"seed baseline: {len(tokens):,} messages from {chats} chats, same fakes, wrk -t2 -c{a.run3_connections} "
            f"(about {len(tokens) / 4 * (a.llm_latency + a.waha_latency + 0.03):.0f} s)")
        last_report = [time.monotonic()]

        def progress() -> None:
            if time.monotonic() - last_report[0] > 30:
                last_report[0] = time.monotonic()
                say(f"  seed baseline: {replies.distinct('sb')}/{len(tokens)} answered")

        try:
            run = drive_once(self.wrk, seed.url, requests_file, tokens, replies, tag="sb", threads=2,
                             connections=a.run3_connections, request_timeout=max(120.0, len(tokens) * 0.6),
                             stall_s=max(a.stall_seconds, 30), drain_s=0.5, folder=self.folder, name="seed",
                             on_tick=progress, idle="poll")
        finally:
            seed.stop()
        took = run.last_reply + a.waha_latency - run.t0
        answered = len({t for _, t in run.delivered})
        rate = answered / took if took > 0 else 0.0
        measured_full = len(tokens) >= full and answered >= full
        full_time = took if measured_full else full / rate if rate else float("inf")
        say(f"  seed baseline: {answered} answered in {took:.1f}s = {rate:.2f} messages/s"
            + ("" if measured_full else f"; {full:,} messages would take ≈ {full_time:.0f}s"))
        r = self.results
        label = "measured" if measured_full else f"extrapolated from {answered} answered messages"
        r.row("3", f"Seed-style baseline (Flask, gunicorn -w 4 sync, asyncio.run + new AsyncClient per message): "
                   f"throughput / time for {full:,} msgs", f"{rate:.2f} msgs/s / {full_time:,.0f} s ({label})")
        if our_time:
            r.row("3", "Speed-up: baseline time / our time", f"{full_time / our_time:,.0f}×")
        if run.check.duplicates or run.check.missing:
            r.notes.append(f"seed baseline delivery check (not a target): {run.check.text()}")
        r.data["seed"] = {"messages": len(tokens), "took_s": took, "rate": rate, "full_time_s": full_time,
                          "measured": measured_full, "check": run.check.__dict__, "wrk": run.wrk.data}

    # -- repetitions -----------------------------------------------------------------------------
    def repeated(self, label: str, key: str, runner: Callable[[Gunicorn], float | None], *,
                 higher_is_better: bool, env: dict[str, str] | None = None,
                 show: Callable[[float], str] | None = None) -> float | None:
        """Run 2 or 3 --repeat times, each on a fresh server and state file; the table shows the median run.

        These machines are noisy (±15 % between runs), so one run is an anecdote; the median run's rows go
        in the table, and one more row lists every repetition's headline figure.
        """
        r, outcomes = self.results, []
        for index in range(self.args.repeat):
            rows, notes = r.rows, r.notes
            r.rows, r.notes = [], []
            self.repetition = (f"-{index + 1}" if self.args.repeat > 1 else "") + self.key("")
            server = self.start_server(f"server-{label.replace(' ', '-')}{self.repetition}", env)
            value = None
            watch = PgConnections(self.pg.url()) if self.store == "postgresql" and self.pg else None
            try:
                if watch:
                    watch.start()
                value = runner(server)
                if watch:
                    watch.stop()
                    self.database_rows(label, key, watch, workers=len(server.worker_pids()))
            finally:
                if watch:
                    watch.stop()
                server.stop()
                outcomes.append((value, r.rows, r.notes, r.data.get(key)))
                r.rows, r.notes = rows, notes
        measured = [o for o in outcomes if o[0] is not None]
        if not measured:
            return None
        ordered = sorted(measured, key=lambda o: o[0], reverse=higher_is_better)
        value, rows, notes, data = ordered[(len(ordered) - 1) // 2]
        r.rows += rows
        r.notes += notes
        r.data[key] = data
        if len(outcomes) > 1:
            if show is None:
                unit = "messages/s" if higher_is_better else "s"
                figures = ", ".join(f"{o[0]:,.0f}" if higher_is_better else f"{o[0]:.2f}" for o in measured)
                text = f"{figures} {unit}; median {value:,.{0 if higher_is_better else 2}f}"
            else:
                text = ", ".join(show(o[0]) for o in measured) + f"; median {show(value)}"
            r.row(label, f"… {len(outcomes)} repetitions, each on a fresh server (rows above: the median one)", text)
            r.data[key + "_repetitions"] = [o[3] for o in outcomes]
        return value

    def database_rows(self, label: str, key: str, watch: PgConnections, *, workers: int) -> None:
        """PostgreSQL runs: connections each worker held, and the database's share of the CPU."""
        r = self.results
        r.row(label, "PostgreSQL connections per worker: open / busy at once (peaks, pg_stat_activity every 0.25 s)",
              watch.text(workers))
        data = r.data.get(key) or {}
        cpu, wall = data.get("cpu") or {}, data.get("cpu_wall") or 0.0
        if "PostgreSQL" in cpu and wall:
            share = cpu["PostgreSQL"] / max(sum(cpu.values()), 1e-9)
            r.row(label, "PostgreSQL's CPU (postmaster and backends): share of all CPU used in the run; cores",
                  f"{100 * share:.0f} %; {cpu['PostgreSQL'] / wall:.2f} of {os.cpu_count()} cores")
            data["db_cpu_share"] = share
        data["pg_connections"] = watch.peaks

    def compare_stores(self, rates: dict[str, float | None], times: dict[str, float | None]) -> None:
        """--store both: PostgreSQL's figures against SQLite's, measured side by side in this invocation."""
        r = self.results
        if rates.get("sqlite") and rates.get("postgresql"):
            ratio = (rates["postgresql"] or 0.0) / (rates["sqlite"] or 1.0)
            r.row("2 pg", "PostgreSQL / SQLite throughput (run 2, side by side)", f"{100 * ratio:.0f} %", "≥ 70 %",
                  verdict(ratio >= 0.7))
            r.data["run2_pg_vs_sqlite"] = ratio
        if times.get("sqlite") and times.get("postgresql"):
            ratio = (times["postgresql"] or 0.0) / (times["sqlite"] or 1.0)
            r.row("3 pg", "PostgreSQL / SQLite time (run 3, side by side)", f"{ratio:.2f}×", "≤ 1.2×",
                  verdict(ratio <= 1.2))
            r.data["run3_pg_vs_sqlite"] = ratio

    def start_postgres(self) -> None:
        try:
            self.pg = PostgresServer.start()
        except PostgresUnavailable as exc:
            raise HarnessError(f"--store {self.args.store}: {exc}") from None
        self.procs.started.append(self.pg)  # type: ignore[arg-type] # stopped with the rest, whatever happens
        say(f"PostgreSQL for runs 2, 3 and 5: {self.pg.url()} (pid {self.pg.backend_pid()}, settings of "
            "fakes/postgres_server.py: fsync off, like SQLite's synchronous=NORMAL it survives process crashes)")

    # -- whole thing -----------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.wrk = find_wrk(a.wrk)
        r = self.results
        r.machine = machine_description(self.wrk)
        r.command = "python -m bench.run_bench " + " ".join(sys.argv[1:])
        write_ack_file(self.folder / "ack.txt", self.hmac_key)
        say(f"work folder {self.folder}")
        self.llm = Fake(self.procs, "fakes.fake_openrouter", "fake-llm", LLM_KEY, self.folder)
        self.waha = Fake(self.procs, "fakes.fake_waha", "fake-waha", WAHA_KEY, self.folder)
        say(f"fakes: LLM {self.llm.url} (pid {self.llm.pid}), WAHA {self.waha.url} (pid {self.waha.pid})")
        our_time = None
        stores = ["sqlite", "postgresql"] if a.store == "both" else [a.store]
        if "postgresql" in stores:
            self.start_postgres()
        self.store = stores[0]
        if 1 in a.runs:
            server, hello = self.start_server("server-a"), self.start_hello()
            self.run1(server, hello)
            hello.stop()
            server.stop()
        rates: dict[str, float | None] = {}
        times: dict[str, float | None] = {}
        if 2 in a.runs:
            for self.store in stores:
                rates[self.store] = self.repeated(self.lab("2"), self.key("run2"), self.run2, higher_is_better=True)
        if {3, 4} & a.runs:
            for self.store in stores:
                times[self.store] = self.repeated(self.lab("3"), self.key("run3"), self.run3, higher_is_better=False)
            our_time = times.get(stores[0])
        if 5 in a.runs:
            for self.store in stores:
                self.repeated(self.lab("5a"), self.key("run5a"), self.run5a, higher_is_better=False,
                              env={"DEBOUNCE_SECONDS": "0"}, show=lambda ms: f"{ms:.1f} ms")
                self.repeated(self.lab("5b"), self.key("run5b"), self.run5b, higher_is_better=False,
                              env={"DEBOUNCE_SECONDS": f"{a.run5_debounce:g}"}, show=lambda ms: f"{ms:.0f} ms")
        self.compare_stores(rates, times)
        self.store = stores[0]
        if not a.skip_baseline and 3 in a.runs:
            self.baseline(our_time)
        r.data["server_gunicorn"] = {k: self.server_config.get(k) for k, _ in SHARED_GUNICORN}
        self.print_table()
        if r.once_violations:
            say("exactly-once violated: " + "; ".join(r.once_violations))
            return 1
        return 0

    def print_table(self) -> None:
        r, a = self.results, self.args
        cfg = r.data.get("server_gunicorn", {})
        print()
        print("## Benchmark results")
        print()
        print(f"Command: `{r.command.strip()}`" + ("  (quick: smoke-test sizes, figures are rough)" if a.quick else ""))
        print()
        for name, value in r.machine.items():
            print(f"- {name}: {value}")
        print(f"- server: gunicorn -c gunicorn.conf.py ({cfg.get('worker_class')}, {cfg.get('workers')} workers × "
              f"{cfg.get('threads')} threads), LOG_LEVEL={a.log_level}, TYPING_SIMULATION=false, "
              f"DEBOUNCE_SECONDS={a.debounce_seconds:g}, RATE_LIMIT_PER_MINUTE=100000, DAILY_MESSAGE_LIMIT=1000000, "
              f"other settings default, HMAC on, STATE_DB on {Path(tempfile.gettempdir())} (disk)"
              + (" or, for rows marked pg, a PostgreSQL database of the bench's own server" if a.store != "sqlite"
                 else ""))
        print()
        print("| Run | Measure | Result | Target | Verdict |")
        print("|---|---|---|---|---|")
        for row in sorted(r.rows, key=lambda row: row[0]):  # stable: keeps each run's own order
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        print()
        for note in r.notes:
            print(f"- {note}")
        print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs for CI smoke tests (rough figures)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the seed-style baseline")
    p.add_argument("--baseline-messages", type=int, default=None,
                   help="messages sent to the seed baseline (default 1000; 40 with --quick); fewer = extrapolated")
    p.add_argument("--runs", default="1,2,3,5",
                   help="which runs (4 = memory, measured within run 3; 5 = single-message overhead)")
    p.add_argument("--run1-seconds", type=float, default=None, help="length of each run 1 wrk pass (5; 2 quick)")
    p.add_argument("--run1-reps", type=int, default=None, help="alternating ours/bare pairs in run 1 (3; 1 quick)")
    p.add_argument("--run2-messages", type=int, default=None, help="messages in run 2 (4000; 600 quick)")
    p.add_argument("--run2-chats", type=int, default=300)
    p.add_argument("--run2-connections", type=int, default=64)
    p.add_argument("--run3-chats", type=int, default=500)
    p.add_argument("--run3-per-chat", type=int, default=2)
    p.add_argument("--run3-connections", type=int, default=256, help="concurrent deliveries (WAHA does not wait)")
    p.add_argument("--run5-messages", type=int, default=None,
                   help="single messages in run 5a, debounce off (200; 40 quick)")
    p.add_argument("--run5-debounce-messages", type=int, default=None,
                   help="single messages in run 5b, debounce on (8; 3 quick): each waits the window")
    p.add_argument("--run5-debounce", type=float, default=1.5,
                   help="DEBOUNCE_SECONDS of run 5b (not a whole second: see bench/README.md)")
    p.add_argument("--skip-floor", action="store_true", help="do not measure run 3's perfect-server floor")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs 2, 3 and 5 this many times, each on a fresh server; the table shows the median")
    p.add_argument("--llm-latency", type=float, default=1.0)
    p.add_argument("--waha-latency", type=float, default=0.05)
    p.add_argument("--debounce-seconds", type=float, default=0.0,
                   help="DEBOUNCE_SECONDS for our server (its default, 3, waits on purpose before answering)")
    p.add_argument("--workers", type=int, default=2, help="workers of our server (gunicorn -w)")
    p.add_argument("--threads", type=int, default=32, help="GUNICORN_THREADS for our server")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--stall-seconds", type=float, default=20.0, help="give up waiting after this long without a reply")
    p.add_argument("--drain-seconds", type=float, default=None, help="extra wait for late duplicates (3; 1 quick)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="diagnostics: an extra environment variable for our server (repeatable)")
    p.add_argument("--server-app", default="whatsapp_webhook_server:app",
                   help="diagnostics: the WSGI app gunicorn loads (e.g. an instrumented wrapper)")
    p.add_argument("--store", default="sqlite", choices=("sqlite", "postgresql", "both"),
                   help="STATE_DB of our server; both = runs 2, 3 and 5 on SQLite, then on PostgreSQL (started by the "
                        "bench from the machine's binaries, fakes/postgres_server.py), compared side by side")
    p.add_argument("--wrk", help="path to wrk (default: on PATH; installed with apt-get when root)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, wrk output, state files)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"run1_seconds": 2.0 if quick else 5.0, "run1_reps": 1 if quick else 3,
                "run2_messages": 600 if quick else 4000, "baseline_messages": 40 if quick else 1000,
                "drain_seconds": 1.0 if quick else 3.0, "run5_messages": 40 if quick else 200,
                "run5_debounce_messages": 3 if quick else 8}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.runs = {int(x) for x in args.runs.split(",") if x.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    bench = Bench(args, folder)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # run the clean-up below on SIGTERM too
    code = 2
    try:
        code = bench.run()
    except HarnessError as exc:
        say(f"harness failure: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        bench.procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if args.json:
            args.json.write_text(json.dumps({"machine": bench.results.machine, "command": bench.results.command,
                                             "rows": bench.results.rows, "notes": bench.results.notes,
                                             "data": bench.results.data}, indent=2, default=str))
        if args.keep or code == 2:
            say(f"work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
