"""ASGI entry point: HTTP through Django, WebSockets through Channels.

The operator pages' static files (a few small CSS/JS files and vendored htmx) are served by Django's
staticfiles handler from the app and project static folders, so uvicorn alone serves a working UI; a reverse
proxy in front may serve `/static/` itself."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from localai_cluster.lean_asgi import (  # noqa: E402
    LeanASGIHandler,
    body_limit,
    lean_paths_router,
    with_lifespan,
)
from localai_cluster.routing import websocket_urlpatterns  # noqa: E402
from localai_cluster.wsorigin import SameOriginValidator  # noqa: E402

# The OpenAI gateway and the probes skip Django's middleware stack (see lean_asgi); everything else gets it.
LEAN_PATHS = ("/v1/", "/healthz", "/readyz", "/metrics")
# Every HTTP route: bodies over LOCALAI_MAX_BODY_BYTES are refused (413) before they are read.
http_app = body_limit(
    lean_paths_router(LeanASGIHandler(), ASGIStaticFilesHandler(django_asgi_app), LEAN_PATHS)
)

protocols = ProtocolTypeRouter(
    {
        "http": http_app,
        # Same origin only: the Origin's scheme, host and port must be the connection's own (wsorigin).
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)


async def _close_pools() -> None:
    from scheduling.router import close_hot_pools
    from scheduling.routing import close_clients

    await close_hot_pools()
    await close_clients()


application = with_lifespan(protocols, on_shutdown=_close_pools)
