"""Per-node credentials, derived from `SECRET_KEY` so nothing secret is stored in clear.

- The **node token** authenticates a worker's calls to `/api/node/{id}/*` and the control plane's calls to
  the agent's WorkerControl service. It depends on the node's `token_salt`, which changes at every
  registration, so registering again invalidates the previous token. Only its SHA-256 is stored.
- The **backend token** is what the agent gives its backend processes (`LOCALAI_GRPC_AUTH_TOKEN`) and the
  gateway presents to them. It depends on the same salt, so it too changes at every registration: a backend
  started after a registration refuses the token of the one before. It is answered only to the node's own
  registration. The gateway needs it on every request, so each process remembers the tokens of the last
  `BACKEND_TOKEN_CACHE_SIZE` (node id, salt) pairs (`backend_token`): a new salt is a new key, hence a new
  token at once, and a change of `SECRET_KEY` (tests override it) empties the cache.
- The **node credential** is the agent's own secret, kept in its state file and presented at registration
  to prove that a known name is still the same agent. Only its SHA-256 is stored (`Node.credential_hash`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

from nodes.models import Node


def _hmac_token(message: str) -> str:
    digest = hmac.new(settings.SECRET_KEY.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_token_salt() -> str:
    """A fresh random salt; storing it on the node revokes the previous node token."""
    return secrets.token_hex(16)


def token_hash(token: str) -> str:
    """What is stored in `Node.token_hash`: the SHA-256 of the token, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def node_token_for(node: Node) -> str:
    """The node's current token: HMAC-SHA256(SECRET_KEY, "node-token:<id>:<salt>"), urlsafe base64."""
    return _hmac_token(f"node-token:{node.id}:{node.token_salt}")


def node_token_matches(node: Node, token: str) -> bool:
    """Whether `token` is the node's current token (constant-time; a node without a token matches nothing)."""
    if not node.token_hash or not token:
        return False
    return hmac.compare_digest(token_hash(token), node.token_hash)


def backend_token_for(node: Node) -> str:
    """The token the node's backends require: HMAC-SHA256(SECRET_KEY, "backend-token:<id>:<salt>"), new at
    every registration (needs `id` and `token_salt`)."""
    return backend_token(node.id, node.token_salt)


# Enough for every node of a 10,000-node fleet (a few hundred bytes an entry); a node's previous salts are never
# asked for again, so they are the first to go.
BACKEND_TOKEN_CACHE_SIZE = 16384


@functools.lru_cache(maxsize=BACKEND_TOKEN_CACHE_SIZE)
def backend_token(node_id: Any, token_salt: str) -> str:
    """`backend_token_for` from the node's id and salt (the gateway's claim reads both), remembered per process
    (`BACKEND_TOKEN_CACHE_SIZE` pairs, least recently used first out): the gateway asked for it on every request,
    building a `Node` instance and an HMAC each time."""
    return _hmac_token(f"backend-token:{node_id}:{token_salt}")


def _forget_backend_tokens(*, setting: str, **kwargs: Any) -> None:
    if setting == "SECRET_KEY":
        backend_token.cache_clear()


setting_changed.connect(_forget_backend_tokens, dispatch_uid="nodes.tokens.forget_backend_tokens")


def credential_matches(node: Node, credential: str) -> bool:
    """Whether `credential` is the node's stored credential (constant-time; a node without one matches
    nothing)."""
    if not node.credential_hash or not credential:
        return False
    return hmac.compare_digest(token_hash(credential), node.credential_hash)
