"""The embedded engines: real servers on unix sockets, reachable from a state folder at any depth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from localai_cluster import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_a_deep_state_folder_still_gets_working_sockets(tmp_path):
    """A checkout deep in the file system (CI clones anywhere) must not exceed the unix socket path limit."""
    deep = tmp_path.joinpath(*(["a-rather-long-folder-name"] * 5), ".state")
    assert len(str(deep / "redis.sock")) > 107
    code = (
        "import sys; from pathlib import Path; from localai_cluster import embedded; "
        "import psycopg, redis; d = Path(sys.argv[1]); "
        "pg = embedded.ensure_postgres(d); r = embedded.ensure_redis(d); "
        "import dj_database_url; db = dj_database_url.parse(pg); "
        "psycopg.connect(dbname=db['NAME'], user=db['USER'], host=db['HOST']).execute('select 1'); "
        "print(redis.Redis.from_url(r).ping())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(deep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")


def test_redis_socket_is_short_when_the_state_folder_is_deep(tmp_path):
    deep = tmp_path / ("x" * 120)
    assert len(str(embedded.redis_socket_path(deep))) <= 107
    assert embedded.redis_socket_path(tmp_path) == tmp_path / "redis.sock"
