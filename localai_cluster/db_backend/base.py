"""Django's PostgreSQL backend, with a pool check that never hangs.

Django's psycopg pool checks each connection it hands out with a round trip (`check_connection`), unbounded: on
a frozen database that check waits forever, before any statement (and its deadline) starts. Here the check
polls the socket instead (`localai_cluster.dbhealth`): a connection whose session ended while pooled is dropped
and replaced before a statement is sent on it, and a round trip (under the statement deadline) is made only
when the server sent something meanwhile. Everything else is Django's backend.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.backends.postgresql import base

from localai_cluster.dbhealth import DEADLINE_MARGIN, idle_connection_suspect, statement_deadline


def check_connection(conn: Any) -> None:
    """The pool's check: raises (the pool then drops the connection and hands out another) when `conn` is
    closed or its session ended while it was pooled."""
    if idle_connection_suspect(conn):
        seconds = float(settings.LOCALAI_DB_STATEMENT_TIMEOUT)
        with statement_deadline(conn, seconds + DEADLINE_MARGIN if seconds else 0):
            conn.execute("")


class DatabaseWrapper(base.DatabaseWrapper):
    # Django 5.2's pool property, with `check_connection` as the check (django-stubs omit these privates).
    @property
    def pool(self) -> Any:
        pool_options = self.settings_dict["OPTIONS"].get("pool")
        if self.alias == base.NO_DB_ALIAS or not pool_options:  # type: ignore[attr-defined]
            return None
        pools: dict[str, Any] = self._connection_pools  # type: ignore[attr-defined]
        if self.alias not in pools:
            from psycopg_pool import ConnectionPool

            connect_kwargs = self.get_connection_params()
            connect_kwargs["autocommit"] = True  # as Django: it sets the mode it needs afterwards
            pool = ConnectionPool(
                kwargs=connect_kwargs,
                open=False,
                configure=self._configure_connection,  # type: ignore[attr-defined]
                check=check_connection,
                **(pool_options if isinstance(pool_options, dict) else {}),
            )
            pools.setdefault(self.alias, pool)
        return pools[self.alias]
