"""WhatsApp AI reply server: WAHA webhook -> LLM (OpenRouter or any OpenAI-compatible API) -> WAHA sendText.

The entry point users rely on; the implementation lives in the `whatsapp_webhook` package beside
this file (its docstring maps how one message travels, module by module and thread by thread).

Production:   gunicorn -c gunicorn.conf.py whatsapp_webhook_server:app
Development:  python whatsapp_webhook_server.py
Checks:       python whatsapp_webhook_server.py --check-settings | --check
"""

from __future__ import annotations

import sys
from typing import Any

from whatsapp_webhook import __version__
from whatsapp_webhook.app import begin_shutdown, create_app, get_app, shutdown, start_worker
from whatsapp_webhook.cli import main

__all__ = ["__version__", "begin_shutdown", "create_app", "main", "shutdown", "start_worker"]


def __getattr__(name: str) -> Any:
    """`whatsapp_webhook_server:app` for gunicorn, built on first access so importing this file stays cheap."""
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
