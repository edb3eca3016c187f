"""`DATABASE_URL` with several hosts (an HA pair, libpq's multi-host form): localai_cluster/dburl.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localai_cluster.dburl import parse_database_url

ROOT = Path(__file__).resolve().parents[1]


def test_one_host_is_dj_database_urls_answer():
    config = parse_database_url("postgres://u:p@db.example:6543/cp?sslmode=require")
    assert (config["HOST"], config["PORT"], config["NAME"], config["USER"], config["PASSWORD"]) == (
        "db.example",
        6543,
        "cp",
        "u",
        "p",
    )
    assert config["OPTIONS"] == {"sslmode": "require"}


def test_several_hosts_become_libpq_host_and_port_lists():
    config = parse_database_url(
        "postgresql://app:s%40cret@db1.example:5432,db2.example,[2001:db8::7]:6000/cluster"
        "?target_session_attrs=read-write&sslmode=verify-full"
    )
    assert config["HOST"] == "db1.example,db2.example,2001:db8::7"
    assert config["PORT"] == "5432,5432,6000"
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("cluster", "app", "s@cret")
    assert config["OPTIONS"] == {"target_session_attrs": "read-write", "sslmode": "verify-full"}
    assert config["ENGINE"] == "django.db.backends.postgresql"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u@db1:5432,:5433/cp",  # an empty host
        "postgres://u@db1:5432,db2:port/cp",
        "postgres://u@db1:5432,db2:70000/cp",
        "postgres://u@db1,[::1/cp",
    ],
)
def test_a_bad_host_list_stops_startup_naming_the_variable(url):
    with pytest.raises(ValueError):
        parse_database_url(url)
    result = subprocess.run(
        [sys.executable, "-c", "import localai_cluster.settings"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


def test_every_connection_gets_both_hosts_and_the_session_attribute():
    """Django's settings (hence its pool, the gateway's async pool and the owner's lock session, which all
    build their parameters from them) carry the host list and target_session_attrs."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from nodes.inflight import plain_connection_params as p; "
            "c = p(); print(c['host'], c['port'], c['target_session_attrs'], c['connect_timeout'])",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "localai_cluster.settings",
            "DATABASE_URL": "postgres://u@10.0.0.1:5432,10.0.0.2:5433/cp?target_session_attrs=read-write",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10.0.0.1,10.0.0.2", "5432,5433", "read-write", "5"]
