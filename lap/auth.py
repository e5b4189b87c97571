"""API keys: bearer tokens whose SHA-256 hash alone is stored.

A token is `lap_<key id>_<secret>`. The secret has 256 random bits, so a
plain SHA-256 is as safe as a slow password hash here and costs microseconds
on every request. The key id in the token lets logs and `lap keys list` name
a key without ever showing its secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

Role = Literal["sensor", "reader", "admin"]
ROLES: tuple[str, ...] = ("sensor", "reader", "admin")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_IRI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


class KeyRequestError(ValueError):
    """A key request that cannot be honoured, with a message for the user."""


@dataclass(frozen=True)
class Principal:
    """Who a verified token belongs to."""

    key_id: str
    tenant: str
    role: str
    sensor: str | None
    rate_per_s: float | None = None  # None: the default of `limits.requests_per_s`


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant: str
    role: str
    sensor: str | None
    rate_per_s: float | None
    created_at: datetime
    revoked_at: datetime | None


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    return key_id, f"lap_{key_id}_{secrets.token_urlsafe(32)}"


async def create_key(
    conn: asyncpg.Connection, tenant: str, role: str, sensor: str | None = None, rate_per_s: float | None = None
) -> tuple[str, str]:
    """Create a key; returns (key id, token). The token is shown once and never stored."""
    if not _TENANT.match(tenant):
        raise KeyRequestError(
            f"invalid tenant name {tenant!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if role not in ROLES:
        raise KeyRequestError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
    if sensor is not None:
        if role != "sensor":
            raise KeyRequestError("--sensor only applies to keys with the role 'sensor'")
        if not _IRI.match(sensor):
            raise KeyRequestError(f"invalid sensor IRI {sensor!r}: give an absolute IRI such as https://lms.example.edu/sensor")
    if rate_per_s is not None and not rate_per_s > 0:
        raise KeyRequestError(f"invalid rate {rate_per_s!r}: give a number of requests per second above 0")
    deleted = await conn.fetchval("SELECT deleted_at FROM tenants WHERE name = $1", tenant)
    if deleted is not None:
        raise KeyRequestError(f"tenant {tenant!r} was deleted on {deleted:%Y-%m-%d %H:%M} UTC, and its name is not "
                              "given out again; choose another")
    key_id, token = new_token()
    async with conn.transaction():
        await conn.execute("INSERT INTO tenants (name) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
        await conn.execute(
            "INSERT INTO api_keys (id, tenant, role, sensor, token_hash, rate_per_s) VALUES ($1, $2, $3, $4, $5, $6)",
            key_id, tenant, role, sensor, hash_token(token), rate_per_s,
        )
    return key_id, token


async def verify_token(conn: asyncpg.Connection | asyncpg.Pool, token: str) -> Principal | None:
    """The key's owner, or None for an unknown, malformed or revoked token."""
    if not token.startswith("lap_") or len(token) > 200:
        return None
    row = await conn.fetchrow(
        "SELECT id, tenant, role, sensor, rate_per_s FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL",
        hash_token(token),
    )
    if row is None:
        return None
    return Principal(key_id=row["id"], tenant=row["tenant"], role=row["role"], sensor=row["sensor"],
                     rate_per_s=row["rate_per_s"])


async def list_keys(conn: asyncpg.Connection, tenant: str | None = None, include_revoked: bool = False) -> list[KeyInfo]:
    rows = await conn.fetch(
        """SELECT id, tenant, role, sensor, rate_per_s, created_at, revoked_at FROM api_keys
           WHERE ($1::text IS NULL OR tenant = $1) AND ($2 OR revoked_at IS NULL)
           ORDER BY created_at, id""",
        tenant, include_revoked,
    )
    return [KeyInfo(**dict(row)) for row in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key. False when no active key has this id."""
    result = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return result.endswith(" 1")


class KeyCache:
    """Verified keys, kept `ttl_s` in a replica so that a request costs no query.

    Unknown tokens are remembered briefly too, so a client hammering with a bad
    token costs one query per `negative_ttl_s`. A revocation takes effect within
    `ttl_s`.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_s: float, negative_ttl_s: float = 1.0, max_entries: int = 50_000):
        self.pool = pool
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    async def principal(self, token: str) -> Principal | None:
        key = hash_token(token)
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await verify_token(self.pool, token)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (now + (self.ttl_s if principal else self.negative_ttl_s), principal)
        return principal


def declare_bearer_auth(app, open_paths: set[str]) -> None:
    """Adds the bearer scheme to a FastAPI app's OpenAPI schema (every path but `open_paths` needs a key), so
    that the docs page's "Authorize" sends the key and generated clients know to. The routes check keys
    themselves; this only describes it."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a LAP key, from `lap keys create` (sensor, reader or admin)"}}
            for path, operations in schema.get("paths", {}).items():
                if path not in open_paths:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (RFC 6750), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
