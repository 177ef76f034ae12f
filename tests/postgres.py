"""The test session's PostgreSQL server (fakes/postgres_server.py): started on first use, stopped when the
session ends (tests/conftest.py), one schema or database per test.

Where PostgreSQL cannot be had (not installed, psycopg missing) the tests that need it skip with the reason;
under CI=true that is a failure instead: CI must run both backends.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fakes.postgres_server import PostgresServer, PostgresUnavailable

if TYPE_CHECKING:
    from whatsapp_webhook.pg_store import PostgresStore

_server: PostgresServer | None = None
_problem: str | None = None
_stores: list[PostgresStore] = []
_names = itertools.count(1)
CONTRACT_DATABASE = "contract"


def unavailable(reason: str) -> None:
    message = f"PostgreSQL backend not tested: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: both backends must be tested)", pytrace=False)
    pytest.skip(message)


def server() -> PostgresServer:
    """The session's server, started now if it is not running yet."""
    global _server, _problem
    if _server is None and _problem is None:
        try:
            import psycopg  # noqa: F401 - the store needs it; say so here rather than in every test
        except ImportError as exc:
            _problem = f"psycopg is not installed ({exc}): pip install -r requirements-test.txt"
        else:
            try:
                _server = PostgresServer.start()
                _server.create_database(CONTRACT_DATABASE)
            except PostgresUnavailable as exc:
                _problem = str(exc)
    if _server is None:
        unavailable(_problem or "unknown")
    assert _server is not None
    return _server


def private_server() -> Iterator[PostgresServer]:
    """A server of the caller's own (a fixture body), so stopping or restarting it disturbs no other test."""
    server()  # skips (or fails under CI) the same way when PostgreSQL cannot be had
    try:
        own = PostgresServer.start()
    except PostgresUnavailable as exc:
        unavailable(str(exc))
    yield own
    own.stop()


def fresh_database() -> str:
    """The URL of a new, empty database of the session's server."""
    return server().create_database(f"db{next(_names)}_{os.getpid()}")


def schema_url(folder: Path) -> str:
    """A schema of its own for `folder` (a test's tmp_path), chosen through the URL's options like a user would."""
    name = "t_" + hashlib.sha1(str(folder).encode()).hexdigest()[:20]
    server().psql_execute(f"CREATE SCHEMA IF NOT EXISTS {name}", database=CONTRACT_DATABASE)
    return f"{server().url(CONTRACT_DATABASE)}?options=-csearch_path%3D{name}"


def store_on(folder: Path, clock: Any) -> PostgresStore:
    """tests/test_store_contract.py's BACKENDS["postgresql"]: a store on `folder`'s schema."""
    url = schema_url(folder)
    from whatsapp_webhook.pg_store import PostgresStore

    store = PostgresStore(url, clock=clock)
    _stores.append(store)
    return store


def stop() -> None:
    """Close what the tests left open, then stop the server (pytest_sessionfinish)."""
    global _server
    for store in _stores:
        store.close()
    _stores.clear()
    if _server is not None:
        _server.stop()
        _server = None
