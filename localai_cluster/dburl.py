"""`DATABASE_URL` to Django's database settings, including libpq's multi-host form.

A highly available database is named by all its hosts in one URL, the way libpq spells it:

    postgres://user:password@db1.example:5432,db2.example:5432/cluster?target_session_attrs=read-write

dj-database-url reads one host only (the comma breaks its port), so the host list is taken out here and given
to Django as `HOST="db1.example,db2.example"`, `PORT="5432,5432"`: psycopg hands both lists to libpq, which
tries the hosts in order and, with `target_session_attrs=read-write`, keeps only the one that accepts writes
(a standby, or an old primary that came back read-only, is passed over). Every connection of the control
plane is built from these settings: Django's pool, the gateway's async pool, the in-flight owner's lock
session, the Celery loops and the `reconcile` / `healthcheck` commands.
"""

from __future__ import annotations

from typing import Any

import dj_database_url

DEFAULT_PORT = 5432


def parse_database_url(url: str) -> dict[str, Any]:
    """Django's `DATABASES["default"]` for `url`; raises `ValueError` (with a sentence) when it is malformed."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return dict(dj_database_url.parse(url))
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host_list = authority.rpartition("@")
    if "," not in host_list:
        return dict(dj_database_url.parse(url))
    hosts: list[str] = []
    ports: list[str] = []
    for item in host_list.split(","):
        host, port = _host_and_port(item)
        hosts.append(host)
        ports.append(port)
    # dj-database-url parses everything else (user, password, name, query options) of the same URL with one
    # placeholder host.
    config = dict(dj_database_url.parse(f"{scheme}://{userinfo}{at}multi-host.invalid{tail}"))
    config["HOST"] = ",".join(hosts)
    config["PORT"] = ",".join(ports)
    return config


def _host_and_port(item: str) -> tuple[str, str]:
    from urllib.parse import unquote

    if item.startswith("["):  # [IPv6]:port
        host, bracket, port_part = item[1:].partition("]")
        if not bracket or (port_part and not port_part.startswith(":")):
            raise ValueError(f"bad host {item!r} in the host list")
        port = port_part[1:]
    else:
        host, _, port = item.partition(":")
    host = unquote(host)
    if not host:
        raise ValueError("an empty host in the host list")
    if not port:
        return host, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r} in the host list")
    return host, port
