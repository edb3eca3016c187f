"""One env-driven settings module. Every variable of CONTRACT §2 is read here; a bad value stops start-up."""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from localai_cluster import embedded
from localai_cluster.dburl import parse_database_url
from localai_cluster.env import env_bool, env_bytes, env_file, env_int, env_list, env_seconds, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = embedded.default_state_dir(BASE_DIR)

DEBUG = env_bool("DJANGO_DEBUG", default=False)
_INSECURE_DEV_KEY = "django-insecure-localai-cluster-dev-only"
SECRET_KEY = env_str("DJANGO_SECRET_KEY") or _INSECURE_DEV_KEY
USING_INSECURE_SECRET_KEY = SECRET_KEY == _INSECURE_DEV_KEY
# Unset: loopback names only (a system check warns when DEBUG is off), so a deployment must name its hosts.
ALLOWED_HOSTS_FROM_ENV = "DJANGO_ALLOWED_HOSTS" in os.environ
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# Behind a reverse proxy that terminates TLS: trust its X-Forwarded-Proto and mark cookies Secure.
if env_bool("DJANGO_BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# --- gRPC to the agents: TLS when a CA is given (nodes/agent_clients.py applies it) ----------------------------
LOCALAI_GRPC_TLS_CA = env_file("LOCALAI_GRPC_TLS_CA")
LOCALAI_GRPC_TLS_CLIENT_CERT = env_file("LOCALAI_GRPC_TLS_CLIENT_CERT")
LOCALAI_GRPC_TLS_CLIENT_KEY = env_file("LOCALAI_GRPC_TLS_CLIENT_KEY")
LOCALAI_GRPC_TLS_SERVER_NAME = env_str("LOCALAI_GRPC_TLS_SERVER_NAME").strip()
if bool(LOCALAI_GRPC_TLS_CLIENT_CERT) != bool(LOCALAI_GRPC_TLS_CLIENT_KEY):
    raise ImproperlyConfigured("LOCALAI_GRPC_TLS_CLIENT_CERT and LOCALAI_GRPC_TLS_CLIENT_KEY go together")
if not LOCALAI_GRPC_TLS_CA and (LOCALAI_GRPC_TLS_CLIENT_CERT or LOCALAI_GRPC_TLS_SERVER_NAME):
    raise ImproperlyConfigured(
        "LOCALAI_GRPC_TLS_CLIENT_CERT, _CLIENT_KEY and _SERVER_NAME need LOCALAI_GRPC_TLS_CA (TLS is off without it)"
    )

# --- cluster behaviour (CONTRACT §2) -------------------------------------------------------------
LOCALAI_REGISTRATION_TOKEN = env_str("LOCALAI_REGISTRATION_TOKEN")
LOCALAI_AUTO_APPROVE_NODES = env_bool("LOCALAI_AUTO_APPROVE_NODES", default=False)
LOCALAI_RECONCILE_INTERVAL = env_seconds("LOCALAI_RECONCILE_INTERVAL", 30, minimum=0.1)
LOCALAI_HEALTH_CHECK_INTERVAL = env_seconds("LOCALAI_HEALTH_CHECK_INTERVAL", 15, minimum=0.1)
# How long the overview's samples (one per health tick, `console.MetricSample`) are kept.
LOCALAI_METRICS_RETENTION = env_seconds("LOCALAI_METRICS_RETENTION", 24 * 3600, minimum=60)
LOCALAI_STALE_NODE_THRESHOLD = env_seconds("LOCALAI_STALE_NODE_THRESHOLD", 60, minimum=0.1)
LOCALAI_SCALE_DOWN_DELAY = env_seconds("LOCALAI_SCALE_DOWN_DELAY", 300)
# Load-based autoscaling (scheduling.autoscale): the look-back window the average in-flight is taken over,
# and how often the in-flight samples are taken (at most 5 s).
LOCALAI_AUTOSCALE_WINDOW = env_seconds("LOCALAI_AUTOSCALE_WINDOW", 30, minimum=1)
LOCALAI_AUTOSCALE_SAMPLE_INTERVAL = env_seconds("LOCALAI_AUTOSCALE_SAMPLE_INTERVAL", 5, minimum=0.1)
if LOCALAI_AUTOSCALE_SAMPLE_INTERVAL > 5:
    raise ImproperlyConfigured("LOCALAI_AUTOSCALE_SAMPLE_INTERVAL: at most 5 s")
LOCALAI_PROBE_STALE_AFTER = env_seconds("LOCALAI_PROBE_STALE_AFTER", 120)
LOCALAI_UNSATISFIABLE_TICKS = env_int("LOCALAI_UNSATISFIABLE_TICKS", 3, minimum=1)
LOCALAI_UNSATISFIABLE_COOLDOWN = env_seconds("LOCALAI_UNSATISFIABLE_COOLDOWN", 300)
LOCALAI_LOAD_TIMEOUT = env_seconds("LOCALAI_LOAD_TIMEOUT", 300, minimum=0.1)
# First cooldown after a failed load of a model (doubles per failed attempt, up to 5 min; 0 turns it off).
LOCALAI_LOAD_FAILURE_BACKOFF = env_seconds("LOCALAI_LOAD_FAILURE_BACKOFF", 10)
# Longest an agent may take to stage a model's files before its load (issue 15); a cold request waits
# LOCALAI_LOAD_TIMEOUT plus this for a model with files.
LOCALAI_DOWNLOAD_TIMEOUT = env_seconds("LOCALAI_DOWNLOAD_TIMEOUT", 3600, minimum=0.1)
# Files a catalog model names as cp://NAME live here; the control plane serves them to agents.
LOCALAI_ARTIFACTS_PATH = env_str("LOCALAI_ARTIFACTS_PATH", "./artifacts")
# Deadline of every short WorkerControl call to an agent (stop, admin calls, the logs stream's opening); a
# load waits LOCALAI_LOAD_TIMEOUT on top of it.
LOCALAI_AGENT_CALL_TIMEOUT = env_seconds("LOCALAI_AGENT_CALL_TIMEOUT", 10, minimum=0.1)
# Placement decision records (scheduling.PlacementDecision): kept this long, and at most this many rows;
# the health loop prunes them.
LOCALAI_DECISION_RETENTION = env_seconds("LOCALAI_DECISION_RETENTION", 7 * 24 * 3600, minimum=60)
LOCALAI_DECISION_MAX_ROWS = env_int("LOCALAI_DECISION_MAX_ROWS", 100_000, minimum=100)
# `/v1` answers carry X-LocalAI-Node and X-LocalAI-Replica (where the request ran): off by default.
LOCALAI_EXPOSE_ROUTING_HEADERS = env_bool("LOCALAI_EXPOSE_ROUTING_HEADERS", default=False)
# Routing policy of catalog models that do not choose one (`ModelConfig.routing`; scheduling.routing):
# least_in_flight, prefix_cache or session.
LOCALAI_ROUTING_POLICY = env_str("LOCALAI_ROUTING_POLICY", "least_in_flight").strip() or "least_in_flight"
if LOCALAI_ROUTING_POLICY not in ("least_in_flight", "prefix_cache", "session"):
    raise ImproperlyConfigured(
        f"LOCALAI_ROUTING_POLICY: expected least_in_flight, prefix_cache or session, got {LOCALAI_ROUTING_POLICY!r}"
    )
# prefix_cache: the replica with the longest matched prefix is passed over when its in-flight exceeds the least
# loaded replica's by more than this.
LOCALAI_PREFIX_BALANCE_THRESHOLD = env_int("LOCALAI_PREFIX_BALANCE_THRESHOLD", 4)
# A predictable completion's backend call, or a stream's opening, starts beside its claim
# (scheduling.optimistic).
LOCALAI_OPTIMISTIC_DISPATCH = env_bool("LOCALAI_OPTIMISTIC_DISPATCH", default=True)
# prefix_cache's index in Redis: prompts are hashed in blocks of this many characters; an entry lives this long
# after the last request that matched it, and each model keeps at most this many block entries.
LOCALAI_PREFIX_BLOCK_CHARS = env_int("LOCALAI_PREFIX_BLOCK_CHARS", 256, minimum=16)
LOCALAI_PREFIX_INDEX_TTL = env_seconds("LOCALAI_PREFIX_INDEX_TTL", 600, minimum=1)
LOCALAI_PREFIX_INDEX_MAX_BLOCKS = env_int("LOCALAI_PREFIX_INDEX_MAX_BLOCKS", 50_000, minimum=16)
# A streamed answer whose client has not taken a piece for this long ends, and its in-flight unit comes back.
LOCALAI_STREAM_WRITE_TIMEOUT = env_seconds("LOCALAI_STREAM_WRITE_TIMEOUT", 60, minimum=0.1)
# How often a worker heartbeats (told to agents at registration).
LOCALAI_HEARTBEAT_INTERVAL = env_seconds("LOCALAI_HEARTBEAT_INTERVAL", 10, minimum=0.1)
# The largest request body any route accepts (413 beyond it, in the route's error shape); Django's own
# form-parsing limit agrees.
LOCALAI_MAX_BODY_BYTES = env_bytes("LOCALAI_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = LOCALAI_MAX_BODY_BYTES

# --- engines: embedded unless URLs are given --------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if not DATABASE_URL:
    DATABASE_URL = embedded.ensure_postgres(STATE_DIR)
    os.environ["DATABASE_URL"] = DATABASE_URL
REDIS_URL = env_str("REDIS_URL")
if not REDIS_URL:
    REDIS_URL = embedded.ensure_redis(STATE_DIR)
    os.environ["REDIS_URL"] = REDIS_URL

try:
    # One host, or libpq's multi-host form `postgres://u@db1:5432,db2:5432/name?target_session_attrs=read-write`
    # (an HA pair: see localai_cluster/dburl.py and the README's production section).
    _database = parse_database_url(DATABASE_URL)
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from None
if _database.get("ENGINE") != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL: only PostgreSQL (postgres://...) is supported")
# Django's PostgreSQL backend with a connection check that cannot hang on a frozen database (see the module).
_database["ENGINE"] = "localai_cluster.db_backend"
# psycopg's pool: opening a connection per request would dominate the gateway's hot path.
_DB_POOL = env_bool("LOCALAI_DB_POOL", default=True)
_database["CONN_MAX_AGE"] = 0
# Each connection is checked as it leaves the pool by the backend below (`localai_cluster.db_backend`), not by
# Django's health check (a round trip that hangs on a frozen database): one that died while pooled (its
# session was terminated, the database restarted) is replaced before a statement is sent on it.
_database["CONN_HEALTH_CHECKS"] = False
# How long a request waits for a pooled connection (also while the database is down) before it fails; the
# gateway then answers 503 `control_plane_unavailable`.
LOCALAI_DB_POOL_TIMEOUT = env_seconds("LOCALAI_DB_POOL_TIMEOUT", 10, minimum=0.1)
# Every control-plane statement is bounded (a frozen or unreachable database yields an error, never a hang):
# the server cancels a statement after LOCALAI_DB_STATEMENT_TIMEOUT (0: no limit; the gateway's own statements
# get LOCALAI_DB_POOL_TIMEOUT), a connection attempt gives up after LOCALAI_DB_CONNECT_TIMEOUT, and TCP
# keepalives find a peer that vanished (a lost host, a cut network) on idle and busy connections. These
# options reach every connection: Django's, the gateway's async pool and the in-flight owner's lock session.
LOCALAI_DB_STATEMENT_TIMEOUT = env_seconds("LOCALAI_DB_STATEMENT_TIMEOUT", 30)
LOCALAI_DB_CONNECT_TIMEOUT = env_seconds("LOCALAI_DB_CONNECT_TIMEOUT", 5, minimum=1)
_connection_options: dict[str, object] = {
    # libpq counts whole seconds, and treats 1 as 2.
    "connect_timeout": max(2, int(LOCALAI_DB_CONNECT_TIMEOUT + 0.999)),
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "options": f"-c statement_timeout={int(LOCALAI_DB_STATEMENT_TIMEOUT * 1000)}",
}
_url_options = dict(_database.get("OPTIONS") or {})  # e.g. ?sslmode=require in DATABASE_URL
if "options" in _url_options:
    _connection_options["options"] = f"{_url_options.pop('options')} {_connection_options['options']}"
# How long a pool keeps re-trying one lost connection (psycopg_pool waits 1, 2, 4… s between attempts) before it
# gives that slot up; a request that then finds no connection opens a new one at once. Kept short so that a
# database back after an outage or a failover (docs/reliability.md) is used within about a second, however long
# it was away, instead of at the next doubled attempt. Applies to Django's pool and the gateway's async pool.
DB_POOL_RECONNECT_TIMEOUT = 1.0
_database["OPTIONS"] = {
    **_connection_options,
    **_url_options,
    **(
        {
            "pool": {
                "min_size": 1,
                "max_size": env_int("LOCALAI_DB_POOL_SIZE", 20, minimum=1),
                "timeout": LOCALAI_DB_POOL_TIMEOUT,
                "reconnect_timeout": DB_POOL_RECONNECT_TIMEOUT,
            }
        }
        if _DB_POOL
        else {}
    ),
}
DATABASES = {"default": _database}
# Reads that may lag (the pages, `/api/nodes` lists, the `/metrics` gauges) go to this read replica when set
# (`localai_cluster.db_router`); the claim, the reconciler and every write stay on DATABASE_URL.
DATABASE_REPLICA_URL = env_str("DATABASE_REPLICA_URL")
if DATABASE_REPLICA_URL:
    try:
        _replica = parse_database_url(DATABASE_REPLICA_URL)
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_REPLICA_URL: {exc}") from None
    if _replica.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_REPLICA_URL: only PostgreSQL (postgres://...) is supported")
    _replica_url_options = dict(_replica.get("OPTIONS") or {})
    # The same connection options and pool as the primary's, without what DATABASE_URL's query string added.
    _replica_options = {
        key: value
        for key, value in _database["OPTIONS"].items()
        if key not in _url_options and key != "options"
    }
    _statement_timeout = f"-c statement_timeout={int(LOCALAI_DB_STATEMENT_TIMEOUT * 1000)}"
    _replica_options["options"] = f"{_replica_url_options.pop('options', '')} {_statement_timeout}".strip()
    DATABASES["replica"] = {
        **_replica,
        "ENGINE": _database["ENGINE"],
        "CONN_MAX_AGE": _database["CONN_MAX_AGE"],
        "CONN_HEALTH_CHECKS": _database["CONN_HEALTH_CHECKS"],
        "OPTIONS": {**_replica_options, **_replica_url_options},
    }
DATABASE_ROUTERS = ["localai_cluster.db_router.ReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "template_partials",
    "localai_cluster",
    "nodes",
    "scheduling",
    "console",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "audit.context.AuditActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "localai_cluster.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
ASGI_APPLICATION = "localai_cluster.asgi.application"
WSGI_APPLICATION = "localai_cluster.wsgi.application"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/admin/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = STATE_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []

# --- Redis users: Celery and Channels --------------------------------------------------------------
CELERY_BROKER_URL = embedded.celery_broker_url(REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE
# The control loops. Each tick expires after one interval, so ticks that could not run never pile up; each is
# a singleton cluster-wide under an advisory lock, so several beats or workers side by side are harmless.
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "scheduling.tasks.reconcile_tick",
        "schedule": LOCALAI_RECONCILE_INTERVAL,
        "options": {"expires": LOCALAI_RECONCILE_INTERVAL},
    },
    "health": {
        "task": "scheduling.tasks.health_tick",
        "schedule": LOCALAI_HEALTH_CHECK_INTERVAL,
        "options": {"expires": LOCALAI_HEALTH_CHECK_INTERVAL},
    },
    "autoscale-sample": {
        "task": "scheduling.tasks.autoscale_sample_tick",
        "schedule": LOCALAI_AUTOSCALE_SAMPLE_INTERVAL,
        "options": {"expires": LOCALAI_AUTOSCALE_SAMPLE_INTERVAL},
    },
}
# localai_cluster/channel_layer.py: why the read timeout (10 s) must outlast the blocking wait (2 s).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "localai_cluster.channel_layer.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 10, "socket_connect_timeout": 5}]},
    }
}

# --- DRF -------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["localai_cluster.api.BoundedJSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "EXCEPTION_HANDLER": "localai_cluster.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LocalAI Cluster API",
    "DESCRIPTION": "Control plane for a cluster of LocalAI-compatible inference workers.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI's files come with the package (no CDN): /api/docs/ works on a cluster without internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # One line per message: control characters in names from workers or clients are escaped (logsafe).
    "formatters": {
        "plain": {
            "()": "localai_cluster.logsafe.SingleLineFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}, "pgserver": {"level": "WARNING"}},
}
