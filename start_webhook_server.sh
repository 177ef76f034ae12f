#!/usr/bin/env bash
# WhatsApp AI reply server: set up and run.
#
#   ./start_webhook_server.sh          set up (venv, dependencies, .env.webhook) and start the server
#   ./start_webhook_server.sh test     set up the same way and run the whole test suite
#   ./start_webhook_server.sh demo     set up like test and run the no-account demo (fake WAHA + fake LLM)
#
# Production runs gunicorn with gunicorn.conf.py; DEBUG=true runs Flask's development server.
# PYTHON=python3.12 picks the interpreter (3.11 or newer); VENV_DIR moves the virtual environment.

# Plain POSIX up to here, so `sh start_webhook_server.sh` gets this line instead of a syntax error.
if [ -z "${BASH_VERSION:-}" ]; then
  echo "start_webhook_server.sh needs bash: run ./start_webhook_server.sh or bash start_webhook_server.sh" >&2
  exit 64
fi
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV_DIR:-.venv}"
mode="${1:-serve}"
[ $# -gt 0 ] && shift

# The interpreter first: every later failure would otherwise look like a problem of ours.
if ! python_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null)"; then
  found="not found"
  command -v "$PYTHON" >/dev/null 2>&1 && found="$("$PYTHON" --version 2>&1 | head -n 1 || true)"
  echo "start_webhook_server.sh needs Python 3.11 or newer, but $PYTHON is ${found:-not found}; point PYTHON= at another interpreter, e.g. PYTHON=python3.12 ./start_webhook_server.sh" >&2
  exit 69
fi

# venv_is_usable: the venv runs, was made by this interpreter's version, and has pip (a run cut short
# by a failure or another Python leaves one that would fail the same way forever).
venv_is_usable() {
  [ -x "$VENV/bin/python" ] || return 1
  [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$python_version" ] || return 1
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

# setup_venv FILE: create .venv if needed and install FILE, only when it (or what it includes) changed.
setup_venv() {
  local requirements="$1"
  if [ -e "$VENV" ] && ! venv_is_usable; then
    echo "Rebuilding $VENV: it is broken or was made by another Python (now using $PYTHON, Python $python_version)"
    rm -rf "$VENV"
  fi
  if [ ! -e "$VENV" ]; then
    echo "Creating virtual environment in $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
      rm -rf "$VENV"
      echo "Could not create $VENV with $PYTHON; on Debian/Ubuntu: apt-get install python3-venv" >&2
      exit 69
    fi
  fi
  local wanted stamp="$VENV/.${requirements}.sha256"
  wanted="$(cat requirements-*.txt "$requirements" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "Installing $requirements"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$requirements"
    echo "$wanted" > "$stamp"
  fi
}

# tests/test_monitoring.py checks the Prometheus alert rules with promtool, which Debian's prometheus
# package ships. Installed here when missing and we are root; otherwise those tests skip (and fail
# under CI=true, where a missing promtool must not pass unnoticed).
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "promtool not found: installing Debian's prometheus package (apt-get install -y prometheus)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus >/dev/null; }; then
      echo "could not install prometheus: the promtool tests will skip (or fail under CI=true)" >&2
    fi
  fi
}

ensure_env_file() {
  # WEBHOOK_ENV_FILE names the settings file to read instead: then there is nothing to create here.
  if [ -z "${WEBHOOK_ENV_FILE:-}" ] && [ ! -f .env.webhook ]; then
    cp .env.webhook.example .env.webhook
    echo "Created .env.webhook from .env.webhook.example: fill in OPENROUTER_API_KEY and WAHA_API_KEY."
  fi
}

# ensure_postgres: the suite also runs the state store's tests on a real PostgreSQL server, which the tests
# start themselves from the machine's binaries (fakes/postgres_server.py). As root with apt-get, a missing
# PostgreSQL is installed; otherwise those tests skip (and fail under CI=true). Never stops the script.
ensure_postgres() {
  if [ -n "${PG_BIN_DIR:-}" ] || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || command -v pg_ctl >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing PostgreSQL for the state store's tests (apt-get install postgresql-15)"
    if apt-get update -qq >/dev/null && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }; then
      return 0
    fi
    echo "Could not install PostgreSQL: its tests will skip (and fail under CI=true)" >&2
  else
    echo "PostgreSQL is not installed: its tests will skip (apt-get install postgresql-15, or set PG_BIN_DIR)" >&2
  fi
  return 0
}

case "$mode" in
  test)
    setup_venv requirements-test.txt
    ensure_promtool
    ensure_postgres
    # Lint, format and types first, so pytest's summary stays the last line of the output.
    "$VENV/bin/ruff" check .  # the whole repository: tests, bench and fakes too
    "$VENV/bin/ruff" format --check --quiet whatsapp_webhook whatsapp_webhook_server.py
    "$VENV/bin/mypy" --no-error-summary
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  demo)
    setup_venv requirements-test.txt  # the fakes need jsonschema
    exec "$VENV/bin/python" -m demo.run_demo "$@"
    ;;
  serve)
    setup_venv requirements-webhook.txt
    ensure_env_file
    # Validates every setting and prints what to fix before anything starts.
    "$VENV/bin/python" whatsapp_webhook_server.py --check-settings
    debug="$("$VENV/bin/python" -c 'from whatsapp_webhook.settings import load_settings; print(load_settings().debug)')"
    if [ "$debug" = "True" ]; then
      exec "$VENV/bin/python" whatsapp_webhook_server.py
    fi
    exec "$VENV/bin/gunicorn" -c gunicorn.conf.py whatsapp_webhook_server:app "$@"
    ;;
  *)
    echo "usage: $0 [serve|test|demo] [extra arguments for gunicorn, pytest or the demo]" >&2
    exit 64
    ;;
esac
