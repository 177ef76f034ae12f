"""Which store STATE_DB names, decided in one place: an SQLite file or a PostgreSQL database."""

from __future__ import annotations

from typing import TYPE_CHECKING

from whatsapp_webhook.settings import is_postgres_url
from whatsapp_webhook.store import StateStore

if TYPE_CHECKING:
    from whatsapp_webhook.pg_store import PostgresStore
    from whatsapp_webhook.settings import Settings


def open_store(settings: Settings, *, one_off: bool = False) -> StateStore | PostgresStore:
    """The store for STATE_DB: store.StateStore for a file path, pg_store.PostgresStore for a postgresql:// URL.

    Nothing is opened yet. `one_off` is for the gunicorn master, which forks the workers afterwards: a
    PostgreSQL store then dials a connection per call instead of keeping a pool (and its threads).
    psycopg is imported only when a PostgreSQL database is used.
    """
    if is_postgres_url(settings.state_db):
        from whatsapp_webhook.pg_store import PostgresStore

        return PostgresStore(
            settings.state_db,
            pool_size=settings.state_db_pool_size,
            timeout=settings.state_db_timeout_seconds,
            pooled=not one_off,
        )
    return StateStore(settings.state_db)
