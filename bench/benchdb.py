"""A bench's own database on the project's PostgreSQL server: the embedded one, unless DATABASE_URL names one.

A bench that fills the database with thousands of rows, or that must not meet what a development database
holds (API keys, which cannot be deleted, would close the gateway to it), works in a database of its own on the
same server, dropped and created afresh at each run."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]


def use_fresh_database(name: str) -> str:
    """Drops and creates the database `name` on the server and points DATABASE_URL at it (before Django is set
    up); answers the server's URL, for `drop_database`."""
    from localai_cluster import embedded

    url = os.environ.get("DATABASE_URL") or embedded.ensure_postgres(embedded.default_state_dir(REPO_ROOT))
    _on_server(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    os.environ["DATABASE_URL"] = urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    return url


def drop_database(server_url: str, name: str) -> None:
    _on_server(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _on_server(url: str, *statements: str) -> None:
    """`statements` on the server's `postgres` database (a database cannot be dropped from inside itself)."""
    import dj_database_url
    import psycopg

    db = dj_database_url.parse(urlunsplit(urlsplit(url)._replace(path="/postgres")))
    fields = {"dbname": "postgres", "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    fields["password"] = db["PASSWORD"]
    conninfo = " ".join(f"{key}='{value}'" for key, value in fields.items() if value)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
