"""Configuration: bad values stop start-up naming the variable; the engines are real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def _import_settings(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import localai_cluster.settings"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOCALAI_RECONCILE_INTERVAL", "abc"),
        ("LOCALAI_STALE_NODE_THRESHOLD", "-5"),
        ("LOCALAI_UNSATISFIABLE_TICKS", "0"),
        ("LOCALAI_UNSATISFIABLE_TICKS", "three"),
        ("LOCALAI_AUTO_APPROVE_NODES", "maybe"),
        ("LOCALAI_LOAD_TIMEOUT", "5 minutes"),
        ("LOCALAI_STREAM_WRITE_TIMEOUT", "forever"),
        ("DJANGO_DEBUG", "perhaps"),
        ("LOCALAI_MAX_BODY_BYTES", "ten megs"),
        ("LOCALAI_ROUTING_POLICY", "round_robin"),
        ("LOCALAI_PREFIX_BALANCE_THRESHOLD", "-1"),
        ("LOCALAI_PREFIX_BLOCK_CHARS", "8"),
        ("LOCALAI_PREFIX_INDEX_TTL", "soon"),
        ("LOCALAI_MAX_BODY_BYTES", "12"),
        ("LOCALAI_DB_STATEMENT_TIMEOUT", "soon"),
        ("LOCALAI_DB_CONNECT_TIMEOUT", "500ms"),
        ("LOCALAI_AUTOSCALE_WINDOW", "half a minute"),
        ("LOCALAI_AUTOSCALE_WINDOW", "0"),
        ("LOCALAI_AUTOSCALE_SAMPLE_INTERVAL", "10s"),
    ],
)
def test_bad_setting_stops_startup_naming_the_variable(name, value):
    result = _import_settings(**{name: value})
    assert result.returncode != 0
    assert name in result.stderr


def test_durations_accept_units():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from localai_cluster import settings as s; print(s.LOCALAI_RECONCILE_INTERVAL, s.LOCALAI_LOAD_TIMEOUT)",
        ],
        cwd=ROOT,
        env={**os.environ, "LOCALAI_RECONCILE_INTERVAL": "500ms", "LOCALAI_LOAD_TIMEOUT": "2m"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.5", "120.0"]


def test_sizes_accept_units(monkeypatch):
    from localai_cluster.env import env_bytes

    for raw, expected in (("1048576", 2**20), ("512k", 512 * 1024), ("10MiB", 10 * 2**20), ("1G", 2**30)):
        monkeypatch.setenv("LOCALAI_MAX_BODY_BYTES", raw)
        assert env_bytes("LOCALAI_MAX_BODY_BYTES", 0) == expected
    assert settings.LOCALAI_MAX_BODY_BYTES == 10 * 2**20 == settings.DATA_UPLOAD_MAX_MEMORY_SIZE


@pytest.mark.django_db
def test_database_is_real_postgresql():
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        assert int(cursor.fetchone()[0]) >= 150000


def test_redis_is_real():
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    assert client.ping()
    assert client.info()["redis_version"]


def test_secret_key_check_refuses_production_without_secret():
    from localai_cluster.checks import check_secret_key

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "USING_INSECURE_SECRET_KEY", True)
        mp.setattr(settings, "DEBUG", False)
        errors = check_secret_key(None)
    assert [e.id for e in errors] == ["localai_cluster.E001"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LOCALAI_GRPC_TLS_CA": "/nonexistent/ca.pem"}, "LOCALAI_GRPC_TLS_CA"),
        ({"LOCALAI_GRPC_TLS_CA": str(ROOT)}, "LOCALAI_GRPC_TLS_CA"),
        ({"LOCALAI_GRPC_TLS_CA": __file__, "LOCALAI_GRPC_TLS_CLIENT_CERT": __file__}, "_CLIENT_KEY"),
        ({"LOCALAI_GRPC_TLS_SERVER_NAME": "agent.internal"}, "LOCALAI_GRPC_TLS_CA"),
    ],
)
def test_bad_grpc_tls_settings_stop_startup_naming_the_variable(env, named):
    result = _import_settings(**env)
    assert result.returncode != 0
    assert named in result.stderr


@pytest.mark.django_db
def test_every_connection_is_bounded_and_the_server_enforces_the_statement_timeout():
    """statement_timeout, connect_timeout and keepalives reach the real session (from Django's settings)."""
    options = settings.DATABASES["default"]["OPTIONS"]
    assert options["keepalives"] == 1 and options["connect_timeout"] >= 2
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        shown = cursor.fetchone()[0]
    assert shown == f"{int(settings.LOCALAI_DB_STATEMENT_TIMEOUT)}s"


def test_query_options_of_database_url_are_kept():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from localai_cluster import settings as s; o = s.DATABASES['default']['OPTIONS'];"
            "print(o['sslmode'], o['options'], o['connect_timeout'])",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": "postgres://u@db.example:5432/cp?sslmode=require",
            "LOCALAI_DB_STATEMENT_TIMEOUT": "1500ms",
            "LOCALAI_DB_CONNECT_TIMEOUT": "3s",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["require", "-c", "statement_timeout=1500", "3"]
