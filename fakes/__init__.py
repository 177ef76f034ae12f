"""What the tests, the demo and the bench share: fake upstreams, WAHA-shaped payloads, the server under gunicorn.

fake_waha, fake_openrouter (and their base): fake WAHA and OpenRouter HTTP servers, also as programs
(`python -m fakes.fake_waha --help`); waha_payloads: webhook bodies as WAHA's engines send them;
gunicorn_server: starts the real server under gunicorn against them; data/: WAHA's OpenAPI spec.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FakeOpenRouter", "FakeWaha", "GunicornError", "GunicornServer", "validate_waha_request"]
_HOMES = {"FakeOpenRouter": "fake_openrouter", "FakeWaha": "fake_waha", "validate_waha_request": "fake_waha",
          "GunicornError": "gunicorn_server", "GunicornServer": "gunicorn_server"}


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m fakes.fake_waha` does not import its own module twice (runpy warning).
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(name)
