"""The Flask app (a thin adapter over the service) and the lifecycle hooks gunicorn.conf.py calls."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
)
from typing import TYPE_CHECKING, Any

import httpx
from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from whatsapp_webhook import CLOSE_CONNECTION_KEY, EXTENSION_KEY, WEBHOOK_PATH, WEBHOOK_SERVICE_NAME
from whatsapp_webhook.health import HealthReporter
from whatsapp_webhook.logs import configure_logging, log
from whatsapp_webhook.metrics import metrics_document
from whatsapp_webhook.service import WebhookService
from whatsapp_webhook.settings import SettingsError, is_postgres_url, load_settings
from whatsapp_webhook.sqlite_base import pin_state_file
from whatsapp_webhook.store_api import StateFileLost, Store, StoreUnavailable
from whatsapp_webhook.stores import open_store
from whatsapp_webhook.worker import WorkerRuntime

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    llm_transport: httpx.AsyncBaseTransport | None = None,
    waha_transport: httpx.AsyncBaseTransport | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    blueprints: Iterable[Blueprint] = (),
) -> Flask:
    """Build the Flask app. Opens no client, thread or loop: those are made per worker on first use.

    The keyword arguments are seams for tests: a store, httpx transports for the
    upstreams and the coroutine used for every wait (backoff, typing pause).
    `blueprints` are your own endpoints, registered after ours (docs/desenvolvimento.md, "Onde mexer").
    Their views reach the service as `current_app.extensions[EXTENSION_KEY]`.
    """
    settings = settings or load_settings()
    configure_logging(settings)
    store = store or open_store(settings)
    try:
        store.initialize()
    except StoreUnavailable as exc:
        # A database server that is down while gunicorn restarts a worker must not stop the whole server:
        # the master already brought the schema up to date, webhooks get 503 until the database is back.
        log.error("state store unavailable at worker start (webhooks get 503 until it is back): %s", exc)
    if not (settings.webhook_secret_token or settings.webhook_hmac_key):
        log.warning(
            "neither WEBHOOK_HMAC_KEY nor WEBHOOK_SECRET_TOKEN is set: anyone who can reach this port "
            "can make the bot send WhatsApp messages; set WEBHOOK_HMAC_KEY to WAHA's HMAC key"
        )
    # gunicorn.conf.py records the master's start so every worker reports the same uptime.
    started_at = float(os.environ.get("WEBHOOK_SERVER_STARTED_AT") or time.time())
    reporter = HealthReporter(store=store)
    service = WebhookService(
        settings=settings,
        store=store,
        started_at=started_at,
        health=reporter,
        runtime_factory=lambda: WorkerRuntime(
            settings=settings,
            store=store,
            health=reporter,
            llm_transport=llm_transport,
            waha_transport=waha_transport,
            sleep=sleep,
        ),
    )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = service

    @app.post(WEBHOOK_PATH)
    def receive_webhook() -> Any:
        body = read_whole_body(request.environ, request.content_length, max_bytes=settings.max_body_bytes)
        answer, status = service.handle_webhook(body, request.headers)
        return jsonify(answer), status

    @app.get(WEBHOOK_PATH)
    def describe_webhook() -> Any:
        document = service.status_document("ok", service=WEBHOOK_SERVICE_NAME)
        document["endpoint"] = WEBHOOK_PATH
        document["accepts"] = "POST application/json (WAHA webhook events: message, message.any, session.status)"
        return jsonify(document)

    @app.get("/health")
    def health() -> Any:
        document, status = service.health_document()
        return jsonify(document), status

    @app.get("/stats")
    def stats() -> Any:
        return jsonify(service.status_document("ok"))

    @app.get("/metrics")
    def metrics() -> Any:
        body, content_type = metrics_document(service.scrape_reading())
        return Response(body, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if exc.code == 413:  # a route other than the webhook read a body with a declared length over the limit
            return body_error(BodyError(413, f"request body is larger than {settings.max_body_bytes} bytes"))
        return jsonify({"error": exc.description or exc.name}), exc.code

    @app.errorhandler(BodyError)
    def body_error(exc: BodyError) -> Any:
        if exc.status == 413:
            service.reject(413, "request rejected status=413 (body over MAX_BODY_BYTES=%d)", settings.max_body_bytes)
        elif exc.status != 408:  # a client too slow is logged and counted by gunicorn_worker, which closes it
            request_id = request.headers.get("X-Webhook-Request-Id", "-")
            service.reject(exc.status, "request=%s rejected status=%d error=%s", request_id, exc.status, exc.error)
        # The rest of the body stays unread: the connection cannot carry another request (gunicorn_worker).
        close_connection = request.environ.get(CLOSE_CONNECTION_KEY)
        if close_connection is not None:
            close_connection()
        return jsonify({"error": exc.error}), exc.status

    @app.errorhandler(StoreUnavailable)
    def store_error(exc: StoreUnavailable) -> Any:
        log.error("state store unavailable: %s", exc)
        return jsonify({"error": "state store unavailable; retry later"}), 503

    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app


class BodyError(Exception):
    """The request's body cannot be used: the status to answer and why (JSON `error`)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def read_whole_body(environ: dict[str, Any], declared: int | None, *, max_bytes: int) -> bytes:
    """The request's body, all of it, whatever its framing (Content-Length or chunked), or BodyError.

    413: over max_bytes; a declared length is refused before reading anything, a chunked body as
    soon as it passes the limit, with the rest left unread. 400: the client left before the end
    (fewer bytes than declared, or a chunked body cut short) or sent malformed chunked encoding.
    408: the body did not arrive within REQUEST_READ_TIMEOUT_SECONDS (gunicorn_worker's deadline).
    The server's own body reader decides what "malformed" is: whatever it raises is about the framing.
    """
    if declared is not None and declared > max_bytes:
        raise BodyError(413, f"request body is larger than {max_bytes} bytes")
    stream = environ.get("wsgi.input")
    if stream is None or (declared is None and not environ.get("wsgi.input_terminated")):
        return b""  # no length and a server that does not frame the body: there is none (as in Werkzeug)
    wanted = max_bytes + 1 if declared is None else declared
    try:
        body: bytes = stream.read(wanted) if wanted else b""
    except TimeoutError:
        raise BodyError(408, "request body not received within REQUEST_READ_TIMEOUT_SECONDS") from None
    except OSError:
        raise BodyError(400, "request body incomplete: the client disconnected before its end") from None
    except Exception as exc:
        raise BodyError(400, f"malformed chunked request body: {str(exc)[:200]}") from None
    if declared is None and len(body) > max_bytes:
        raise BodyError(413, f"request body is larger than {max_bytes} bytes")
    if declared is not None and len(body) < declared:
        raise BodyError(400, f"request body incomplete: got {len(body)} of the {declared} bytes announced")
    return body


def check_local_resources(settings: Settings) -> None:
    """Open LOG_FILE and STATE_DB once, so a bad path (or an unreachable database) stops start-up with a
    SettingsError that names it.

    The schema is left alone: a server that does not own the state file (yet) must not change it.
    """
    configure_logging(settings)
    store = open_store(settings, one_off=True)
    store.check_usable()
    store.close()


def recover_after_restart(settings: Settings) -> int:
    """Called once per server start, before workers exist and only by the server that owns the state file
    (ownership.StateFileOwner): unfinished messages become due at once.

    On SQLite their leases belong to processes of the previous run, so nobody is working on them. A
    PostgreSQL database may be shared by servers on several hosts, and a live one renews its leases:
    only leases that ran out are taken (the rest are a live host's, or expire within LEASE_SECONDS).
    """
    store = open_store(settings, one_off=True)  # no pool in the master: nothing may cross the fork
    try:
        store.initialize()
    except StateFileLost as exc:
        raise SettingsError(f"{exc}; start the server again to use the file now at STATE_DB") from None
    except StoreUnavailable as exc:
        raise SettingsError(f"{exc}; start it, or fix the host and port in STATE_DB") from None
    try:
        recovered = store.expire_leases(only_run_out=is_postgres_url(settings.state_db))
    finally:
        store.close()  # no connection may cross gunicorn's fork
    if not is_postgres_url(settings.state_db):
        pin_state_file(settings.state_db)  # workers refuse a file deleted or replaced from now on
    if recovered:
        log.warning("recovering %d messages left unfinished by the previous run", recovered)
    return recovered


def start_worker(app: Flask | None = None) -> None:
    """Start this worker's loop and dispatcher now (gunicorn's post_worker_init), so recovery needs no traffic."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].runtime()


def begin_shutdown(app: Flask | None = None) -> None:
    """Called on SIGTERM (gunicorn.conf.py chains it to gunicorn's handler)."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].begin_shutdown()


def shutdown(app: Flask | None = None, *, drain_seconds: float = 10.0) -> None:
    """Finish or hand back in-flight replies, then release the loop, clients and database (worker_exit)."""
    target = app or _app
    if target is not None:
        target.extensions[EXTENSION_KEY].close(drain_seconds=drain_seconds)


# The gunicorn target `whatsapp_webhook_server:app`, built on first access in each worker
# (get_app), so importing the package opens nothing before gunicorn forks.
_app: Flask | None = None
_app_lock = threading.Lock()


def get_app() -> Flask:
    """The process's app, built once from the environment; a settings problem is printed in one line."""
    global _app
    with _app_lock:
        if _app is None:
            try:
                _app = create_app()
            except SettingsError as exc:
                print(f"whatsapp_webhook_server: {exc}", file=sys.stderr, flush=True)
                raise
        return _app
