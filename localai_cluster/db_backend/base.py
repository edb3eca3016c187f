"""Django's PostgreSQL backend, with a connection check that neither hangs nor backs off.

Django's psycopg pool checks each connection it hands out with a round trip (`check_connection`): unbounded, so
on a frozen database it waits forever before any statement (and its deadline) starts; and psycopg_pool waits
1, 2, 4… s between two connections that fail the check, so a pool full of terminated sessions takes seconds to
drain. Here the pool has no check (`CONN_HEALTH_CHECKS` is off in settings) and each connection taken from it
is checked by polling its socket (`localai_cluster.dbhealth`): one whose session ended while pooled is closed
and handed back (the pool replaces it) and the next one taken at once, before any statement is sent on it.
Everything else is Django's backend.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.backends.postgresql import base

from localai_cluster.dbhealth import DEADLINE_MARGIN, idle_connection_suspect, logger, statement_deadline


def dead_on_arrival(conn: Any) -> bool:
    """Whether `conn`, just taken from the pool, is closed or its session ended while it was pooled (then it
    is closed). A round trip, under the statement deadline, only when the server sent something meanwhile."""
    if not idle_connection_suspect(conn):
        return False
    if not conn.closed:
        seconds = float(settings.LOCALAI_DB_STATEMENT_TIMEOUT)
        try:
            with statement_deadline(conn, seconds + DEADLINE_MARGIN if seconds else 0):
                conn.execute("")
            return False
        except Exception as error:
            logger.info("dropping a pooled connection whose session ended: %s", error)
            conn.close()
    return True


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: Any) -> Any:
        connection = super().get_new_connection(conn_params)
        pool = self.pool  # type: ignore[attr-defined]  # Django 5.1+; the stubs omit it
        while pool is not None and dead_on_arrival(connection):
            pool.putconn(connection)
            connection = super().get_new_connection(conn_params)
        return connection
