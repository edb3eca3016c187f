"""API keys: creation, revocation and authentication of `Authorization: Bearer <key>`.

A key is `lac_` followed by 43 URL-safe characters. Only its SHA-256 (hex) is stored, with its first 8 characters
as a `prefix` so an operator can tell keys apart; the key itself is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from audit import services as audit
from audit.models import Action
from nodes.models import ApiKey

KEY_PREFIX = "lac_"
PREFIX_LENGTH = 8
# `last_used_at` is refreshed at most this often, so authenticating stays one SELECT on the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=5)


def api_key_hash(raw: str) -> str:
    """The SHA-256 hex digest stored in `ApiKey.key_hash`."""
    return hashlib.sha256(raw.encode("utf-8", errors="surrogatepass")).hexdigest()


def api_key_create(*, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Creates a key; answers the row and the raw key (the only time the raw key is available). Audited as
    `api_key.create` (name, prefix, scope; never the key)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic(durable=True):
        api_key = ApiKey.objects.create(
            name=name, prefix=raw[:PREFIX_LENGTH], key_hash=api_key_hash(raw), is_admin=is_admin
        )
        _audit(Action.API_KEY_CREATE, api_key, before=None, after=_key_state(api_key))
    return api_key, raw


def _key_state(api_key: ApiKey) -> dict:
    return {
        "name": api_key.name,
        "prefix": api_key.prefix,
        "is_admin": api_key.is_admin,
        "revoked_at": api_key.revoked_at,
    }


def _audit(action: str, api_key: ApiKey, *, before: dict | None, after: dict | None) -> None:
    audit.record(
        action=action,
        target_type="api_key",
        target_id=api_key.pk,
        target_name=api_key.name,
        before=before,
        after=after,
    )


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Marks the key revoked (idempotent: the first revocation time is kept). A revoked key is refused.
    A revocation (not a repeated one) is audited as `api_key.revoke`."""
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        before = _key_state(api_key)
        api_key.refresh_from_db(fields=["revoked_at"])
        if revoked:
            _audit(
                Action.API_KEY_REVOKE,
                api_key,
                before={**before, "revoked_at": None},
                after=_key_state(api_key),
            )
    return api_key


def api_key_lookup(raw: str) -> ApiKey | None:
    """The key row for a raw bearer value, revoked or not; None when no key has that hash."""
    if not raw or len(raw) > 512:
        return None
    return ApiKey.objects.filter(key_hash=api_key_hash(raw)).first()


def api_key_authenticate(raw: str) -> ApiKey | None:
    """The active key for a raw bearer value, or None (unknown or revoked). Refreshes `last_used_at` at most
    every few minutes, so a busy gateway does not write on every request."""
    api_key = api_key_lookup(raw)
    if api_key is None or api_key.revoked_at is not None:
        return None
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key


def api_keys_exist() -> bool:
    """Whether any key was ever created. The gateway is open only while this is False; a revoked key still
    counts, so revoking the last (leaked) key does not open the gateway to everyone."""
    return ApiKey.objects.exists()


# The gateway's key rule as one SELECT (the router runs it in the same statement as its claim): `allowed` is
# true while no key was ever created, else only for an active key; `key_id` and `key_last_used_at` name that key.
GATEWAY_AUTH_SELECT = f"""
SELECT NOT EXISTS (SELECT 1 FROM {ApiKey._meta.db_table}) OR key.id IS NOT NULL AS allowed,
       key.id AS key_id, key.last_used_at AS key_last_used_at
FROM (SELECT 1) AS one
LEFT JOIN {ApiKey._meta.db_table} AS key ON key.key_hash = %(hash)s AND key.revoked_at IS NULL
"""
_TOUCH_SQL = f"UPDATE {ApiKey._meta.db_table} SET last_used_at = %s WHERE id = %s"


def gateway_key_hash(raw: str | None) -> str:
    """What `GATEWAY_AUTH_SELECT` compares: the stored hash of a bearer value ("" for none or an absurd one)."""
    return api_key_hash(raw) if raw and len(raw) <= 512 else ""


async def gateway_key_used(conn, key_id: int, last_used_at) -> None:
    """Refreshes `last_used_at` of a key the gateway accepted, at most every `LAST_USED_RESOLUTION` (same rule
    as `api_key_authenticate`), on the gateway's async psycopg connection."""
    now = timezone.now()
    if last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION:
        await conn.execute(_TOUCH_SQL, [now, key_id])
