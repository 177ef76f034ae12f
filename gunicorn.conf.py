"""gunicorn settings for the WhatsApp webhook server: gunicorn -c gunicorn.conf.py whatsapp_webhook_server:app

Every reply waits seconds on the LLM, so workers are gthread: the threads wait on I/O
while the per-worker event loop does the upstream calls (sync workers would cap
throughput at workers / LLM latency). Command-line flags override these values.
"""

import os
import sys
import time

import whatsapp_webhook_server as server

try:
    _settings = server.load_settings()
except server.SettingsError as exc:  # fail in the master with a readable message, not in every worker
    print(f"whatsapp_webhook_server: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# gthread's timeout is a heartbeat, but it must still outlast the slowest synchronous webhook wait.
timeout = int(max(60, _settings.webhook_sync_wait_seconds + 30))
graceful_timeout = 30
keepalive = 5
errorlog = "-"
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
loglevel = _settings.log_level.lower()


def on_starting(server_arbiter):  # noqa: ARG001 - gunicorn hook signature
    # Workers inherit this, so /stats reports the same start time whichever worker answers.
    os.environ["WEBHOOK_SERVER_STARTED_AT"] = str(time.time())


def worker_exit(server_arbiter, worker):  # noqa: ARG001 - gunicorn hook signature
    server.shutdown()
