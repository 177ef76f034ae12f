"""Fakes of the upstreams (WAHA, OpenRouter) and WAHA-shaped payloads, shared by the tests, the demo and the bench."""
from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FakeOpenRouter", "FakeWaha", "validate_waha_request"]
_HOMES = {"FakeOpenRouter": "fake_openrouter", "FakeWaha": "fake_waha", "validate_waha_request": "fake_waha"}


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m fakes.fake_waha` does not import its own module twice (runpy warning).
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(name)
