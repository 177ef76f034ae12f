#!/usr/bin/env bash
# WhatsApp AI reply server: set up and run.
#
#   ./start_webhook_server.sh          set up (venv, dependencies, .env.webhook) and start the server
#   ./start_webhook_server.sh test     set up the same way and run the whole test suite
#   ./start_webhook_server.sh demo     set up like test and run the no-account demo (fake WAHA + fake LLM)
#
# Production runs gunicorn with gunicorn.conf.py; DEBUG=true runs Flask's development server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV_DIR:-.venv}"
mode="${1:-serve}"
[ $# -gt 0 ] && shift

# setup_venv FILE: create .venv if needed and install FILE, only when it (or what it includes) changed.
setup_venv() {
  local requirements="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local wanted stamp="$VENV/.${requirements}.sha256"
  wanted="$(cat requirements-*.txt "$requirements" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "Installing $requirements"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$requirements"
    echo "$wanted" > "$stamp"
  fi
}

ensure_env_file() {
  if [ ! -f .env.webhook ]; then
    cp .env.webhook.example .env.webhook
    echo "Created .env.webhook from .env.webhook.example: fill in OPENROUTER_API_KEY and WAHA_API_KEY."
  fi
}

case "$mode" in
  test)
    setup_venv requirements-test.txt
    # Lint, format and types first, so pytest's summary stays the last line of the output.
    "$VENV/bin/ruff" check whatsapp_webhook whatsapp_webhook_server.py gunicorn.conf.py
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
