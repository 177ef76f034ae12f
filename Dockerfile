# WhatsApp AI reply server: gunicorn + Flask, state in SQLite on the /app/data volume.
#
#   docker build -t whatsapp-webhook-server:local .
#   docker compose up -d          (with WAHA; see docker-compose.yml and .env.compose.example)
#
# Python base pinned by full version; bump it deliberately (and re-run hadolint and the tests).
FROM python:3.11.17-slim-bookworm

# STATE_DB lives on the volume; LOG_FILE empty = log to stdout only (the container's log).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    STATE_DB=/app/data/whatsapp_webhook_state.db \
    LOG_FILE=

WORKDIR /app

# Fixed ids, so a bind-mounted data folder can be chowned to 10001 on the host.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/data \
    && chown app:app /app/data

# Runtime dependencies only (the test suite's requirements-test.txt stays out of the image).
COPY requirements-webhook.txt ./
RUN pip install --no-cache-dir -r requirements-webhook.txt

# Only what runs, plus the operators' live checker (python test_webhook_server.py inside the container).
COPY whatsapp_webhook_server.py gunicorn.conf.py test_webhook_server.py ./
COPY whatsapp_webhook/ ./whatsapp_webhook/

# Numeric, so runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root without reading /etc/passwd.
USER 10001:10001

VOLUME /app/data
EXPOSE 5002

# curl is not in slim images; urlopen raises (exit 1) on a refused connection or a 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WEBHOOK_PORT', '5002'), timeout=4)"]

# Exec form: gunicorn is PID 1 and gets SIGTERM itself (graceful stop); /dev/shm keeps the worker heartbeat off disk.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--worker-tmp-dir", "/dev/shm", "whatsapp_webhook_server:app"]
