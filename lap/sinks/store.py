"""Postgres: connections and the versioned schema migrations.

Migrations are the files `migrations/NNNN_name.sql`, applied in order, each in
its own transaction, under an advisory lock so that concurrent starts do not
race. An applied file must never change: its checksum is kept and checked.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from lap.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x4C4150  # "LAP": pg_advisory_lock key for migrations
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database schema and this version of LAP disagree."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3... without gaps; found {versions}")
    return migrations


async def connect(settings: Settings, database: str | None = None) -> asyncpg.Connection:
    assert settings.db.dsn is not None
    kwargs = {"database": database} if database else {}
    return await asyncpg.connect(
        settings.db.dsn.get_secret_value(), timeout=settings.db.connect_timeout_s, **kwargs
    )


async def create_pool(settings: Settings, background: bool = False) -> asyncpg.Pool:
    """A pool of connections; `background`: the processing side's, whose work in a local Postgres waits behind
    ingest's (`process.background_cpu`)."""
    assert settings.db.dsn is not None
    lower = background and settings.process.background_cpu and "postgres" in settings.local_services()
    return await asyncpg.create_pool(
        settings.db.dsn.get_secret_value(),
        min_size=settings.db.pool_min,
        max_size=settings.db.pool_max,
        timeout=settings.db.connect_timeout_s,
        command_timeout=settings.db.command_timeout_s,
        init=background_backend if lower else None,
    )


async def background_backend(conn: asyncpg.Connection) -> None:
    """Run this connection's backend process of the local Postgres as background CPU work.

    Each Postgres backend leads a session of its own, and where the kernel
    shares the CPU between sessions first (autogroups), each busy backend would
    get as much as all of LAP's other processes together: its session gets the
    lowest weight too. It needs the rights over that process that `lap up` has
    (the same user, or root).
    """
    from lap.process import run_in_background

    pid = await conn.fetchval("SELECT pg_backend_pid()")
    if run_in_background(pid, whole_process=False):
        try:
            with open(f"/proc/{pid}/autogroup", "w") as group:
                group.write("19")
        except OSError:  # no autogroups on this kernel
            pass


async def ensure_database(settings: Settings) -> None:
    """Create the database named in the DSN if it is missing (local stand-in only)."""
    try:
        conn = await connect(settings)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    admin = await connect(settings, database="postgres")
    try:
        name = _database_name(settings)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def _database_name(settings: Settings) -> str:
    from urllib.parse import urlparse

    assert settings.db.dsn is not None
    name = urlparse(settings.db.dsn.get_secret_value()).path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name or ""):
        raise MigrationError(f"cannot create a database named {name!r}: use letters, digits and _")
    return name


async def migrate(settings: Settings) -> list[int]:
    """Bring the schema up to date as its owner (db.admin_dsn, else db.dsn); returns the versions applied.

    With an admin DSN, dsn's user is created if missing (with dsn's password), then granted reads and writes
    on every table and sequence, and no more: the replicas and actors, which hold dsn, can change rows but
    not the schema. A new user name in dsn is how its password is rotated (docs/operations.md, "Rotate").
    """
    admin = settings.db.admin_dsn
    if admin is None:
        conn = await connect(settings)
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()
    conn = await asyncpg.connect(admin.get_secret_value(), timeout=settings.db.connect_timeout_s)
    try:
        applied = await apply_migrations(conn)
        user, password = _user_and_password(settings)
        owner = await conn.fetchval("SELECT current_user")
        if user != owner:
            role = '"' + user.replace('"', '""') + '"'
            async with conn.transaction():
                if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
                    # the SCRAM verifier, not the password: a logged statement shows nothing to log in with
                    literal = await conn.fetchval("SELECT quote_literal($1)", scram_verifier(password))
                    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD {literal}")
                await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
                await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
                await conn.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}")
                # the schema's version is read, never written, by the rows' user
                await conn.execute(f"REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM {role}")
        return applied
    finally:
        await conn.close()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """Postgres's SCRAM-SHA-256 form of a password (RFC 5802, 7677), as `CREATE ROLE ... PASSWORD` takes it."""
    import base64
    import hmac

    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return (f"SCRAM-SHA-256${iterations}:{encode(salt)}"
            f"${encode(hashlib.sha256(client_key).digest())}:{encode(server_key)}")


def _user_and_password(settings: Settings) -> tuple[str, str]:
    from urllib.parse import unquote, urlparse

    assert settings.db.dsn is not None
    dsn = urlparse(settings.db.dsn.get_secret_value())
    if not dsn.username or not dsn.password:
        raise MigrationError("with db.admin_dsn set, db.dsn must name a user and its password: LAP creates that "
                             "user if needed and grants it access to its tables")
    return unquote(dsn.username), unquote(dsn.password)


async def apply_migrations(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Bring the schema up to date. Returns the versions applied by this call.

    A schema already up to date is only read (checked against the files), so a user without DDL rights may
    call this too (`db.admin_dsn`).
    """
    migrations = load_migrations() if migrations is None else migrations
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        if not _pending(await _applied(conn), migrations):
            return []
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        if not await conn.fetchval("SELECT has_schema_privilege('public', 'CREATE')"):
            raise MigrationError(f"the schema needs migrations and {await conn.fetchval('SELECT current_user')} "
                                 "may not make them: run them as the tables' owner (db.admin_dsn; on a cluster, "
                                 "`lap_deploy` on the head)")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        for migration in _pending(await _applied(conn), migrations):  # again: another start may have applied some
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now


async def _applied(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    return {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}


def _pending(applied: dict[int, asyncpg.Record], migrations: list[Migration]) -> list[Migration]:
    """The migrations still to apply; refuses a database migrated by a newer release or an edited migration."""
    known = {m.version for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        raise MigrationError(
            f"the database has migrations {newer} that this LAP does not know: it was migrated by a newer "
            f"release. Run that release, or restore a backup."
        )
    for migration in migrations:
        row = applied.get(migration.version)
        if row is not None and row["checksum"] != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name}.sql changed after it was applied. "
                f"Never edit an applied migration: add a new one."
            )
    return [m for m in migrations if m.version not in applied]


async def schema_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
