"""gunicorn settings for the WhatsApp webhook server: gunicorn -c gunicorn.conf.py whatsapp_webhook_server:app

Every reply waits seconds on the LLM, so workers are gthread: the threads wait on I/O
while the per-worker event loop does the upstream calls (sync workers would cap
throughput at workers / LLM latency). They are gthread with a read deadline
(whatsapp_webhook.gunicorn_worker): a client must deliver each whole request within
REQUEST_READ_TIMEOUT_SECONDS, so slow clients cannot hold the threads. Command-line flags
override these values.
"""

import os
import shutil
import signal
import sys
import tempfile
import time


def _fresh_metrics_dir() -> str:
    """prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, so this runs first.

    Files left by a previous run would add old totals to the new ones: the directory is
    emptied (when given) or made new (when not) at every start.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not given:
        return tempfile.mkdtemp(prefix="whatsapp-webhook-metrics-")
    os.makedirs(given, exist_ok=True)
    for name in os.listdir(given):
        if name.endswith(".db"):
            os.remove(os.path.join(given, name))
    return given


_made_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _fresh_metrics_dir()

from prometheus_client import multiprocess  # noqa: E402 - must follow PROMETHEUS_MULTIPROC_DIR

from whatsapp_webhook import app as lifecycle  # noqa: E402 - recovery, worker start, shutdown
from whatsapp_webhook.logs import configure_logging  # noqa: E402
from whatsapp_webhook.ownership import StateFileBusy, StateFileOwner, port_in_use_message  # noqa: E402
from whatsapp_webhook.settings import SettingsError, load_settings, unknown_setting_warnings  # noqa: E402


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{name} must be a whole number of at least 1, got {raw!r}")
    return int(raw)


try:  # fail in the master with one readable message, not with a traceback in every worker
    _settings = load_settings()
    lifecycle.check_local_resources(_settings)
    _workers = _positive_int("GUNICORN_WORKERS", 2)
    _threads = _positive_int("GUNICORN_THREADS", 32)
    _graceful = _positive_int("GUNICORN_GRACEFUL_TIMEOUT", 30)
except SettingsError as exc:
    print(f"whatsapp_webhook_server: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
for _warning in unknown_setting_warnings(os.environ):
    print(f"whatsapp_webhook_server: warning: {_warning}", file=sys.stderr, flush=True)

# This server's own folder for what must not be shared with any other gunicorn on the machine:
# the control socket (gunicorn's default, ~/.gunicorn/gunicorn.ctl, is one per user).
_runtime_dir = tempfile.mkdtemp(prefix="whatsapp-webhook-run-")
control_socket = os.path.join(_runtime_dir, "gunicorn.ctl")
# Taken in when_ready, once the port is bound: see whatsapp_webhook/ownership.py.
_owner = StateFileOwner(_settings.state_db)

bind = f"{_settings.host}:{_settings.port}"
worker_class = "whatsapp_webhook.gunicorn_worker.ReadDeadlineWorker"
workers = _workers
threads = _threads
# gthread's timeout is a heartbeat, but it must still outlast the slowest synchronous webhook wait.
timeout = int(max(60, _settings.webhook_sync_wait_seconds + 30))
graceful_timeout = _graceful
keepalive = 5
# The heartbeat file's fchmod can stall on a disk-backed /tmp (containers); /dev/shm is memory.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
errorlog = "-"
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
loglevel = _settings.log_level.lower()


# Replies still in flight at SIGTERM get this long to finish; the rest go back to the inbox
# and the next start finishes them. Kept under graceful_timeout so the master never kills us first.
REPLY_DRAIN_SECONDS = max(1, graceful_timeout - 10)


def _refuse_to_start(message):
    """One line instead of gunicorn's retries or a traceback; nothing of the running server is touched."""
    print(f"whatsapp_webhook_server: {message}", file=sys.stderr, flush=True)
    _remove_runtime_folders()
    sys.exit(2)


def on_starting(server_arbiter):
    # Workers inherit this, so /stats reports the same start time whichever worker answers.
    os.environ["WEBHOOK_SERVER_STARTED_AT"] = str(time.time())
    configure_logging(_settings)
    for address in server_arbiter.cfg.address:  # before gunicorn's own bind, which retries for 5 s
        if isinstance(address, tuple) and (message := port_in_use_message(address[0], address[1])):
            _refuse_to_start(message)


def when_ready(server_arbiter):
    # The port is ours now. Recovery (and any schema change) only by the one server owning the file. On
    # PostgreSQL there is no file: every server (on any host) runs it, and it takes only leases that ran out.
    try:
        _owner.acquire()
    except StateFileBusy as exc:
        _refuse_to_start(exc)
    lifecycle.recover_after_restart(_settings)


def post_fork(server_arbiter, worker):
    # A worker must not keep the claim alive once the master is gone (kill -9 of the master).
    _owner.forget_in_child()
    # How long this worker's clients get to deliver each whole request (the class alone would use 10 s).
    worker.read_timeout_seconds = _settings.request_read_timeout_seconds


def post_worker_init(worker):
    # Start the dispatcher now: messages left by a killed worker must be finished without new traffic.
    lifecycle.start_worker()
    # On SIGTERM, webhook requests stop waiting for replies at once (their messages are safe in the
    # inbox), so gunicorn reaches worker_exit quickly and the drain gets its full time.
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        lifecycle.begin_shutdown()
        if callable(gunicorn_handler):
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_exit(server_arbiter, worker):
    lifecycle.shutdown(drain_seconds=REPLY_DRAIN_SECONDS)


def child_exit(server_arbiter, worker):
    # A dead worker's in-flight gauge must not count any more (its counters stay in the totals).
    multiprocess.mark_process_dead(worker.pid)


def _remove_runtime_folders():
    shutil.rmtree(_runtime_dir, ignore_errors=True)
    if _made_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def on_exit(server_arbiter):
    _owner.release()
    _remove_runtime_folders()
