"""Schema migrations: versioned files, applied once, in order, checked for changes."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from lap.sinks.store import Migration, MigrationError, apply_migrations, connect, load_migrations, schema_version


@pytest.fixture
async def fresh_db(settings):
    """An empty database in the Postgres stand-in, dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    admin = await connect(settings, database="postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    conns = []

    async def open_conn():
        conn = await connect(settings, database=name)
        conns.append(conn)
        return conn

    yield open_conn
    for conn in conns:
        await conn.close()
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


def test_packaged_migrations_are_numbered_without_gaps():
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.sql.strip() for m in migrations)


def test_badly_named_or_gapped_files_are_refused(tmp_path: Path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations(tmp_path)
    (tmp_path / "0003_c.sql").rename(tmp_path / "third.sql")
    with pytest.raises(MigrationError, match="0001_name.sql"):
        load_migrations(tmp_path)


async def test_apply_once_then_nothing(fresh_db):
    conn = await fresh_db()
    expected = [m.version for m in load_migrations()]
    assert await schema_version(conn) == 0
    assert await apply_migrations(conn) == expected
    assert await schema_version(conn) == expected[-1]
    assert await conn.fetchval("SELECT to_regclass('api_keys') IS NOT NULL")
    assert await apply_migrations(conn) == []


async def test_concurrent_starts_apply_each_migration_once(fresh_db):
    a, b = await fresh_db(), await fresh_db()
    results = await asyncio.gather(apply_migrations(a), apply_migrations(b))
    applied = sorted(v for result in results for v in result)
    assert applied == [m.version for m in load_migrations()]
    assert await a.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)


async def test_a_changed_applied_migration_is_refused(fresh_db):
    conn = await fresh_db()
    migrations = load_migrations()
    await apply_migrations(conn, migrations)
    edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in migrations]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await apply_migrations(conn, edited)


async def test_a_database_from_a_newer_release_is_refused(fresh_db):
    conn = await fresh_db()
    migrations = load_migrations()
    newer = migrations + [Migration(len(migrations) + 1, "future", "CREATE TABLE future_table (id int);")]
    await apply_migrations(conn, newer)
    with pytest.raises(MigrationError, match="newer release"):
        await apply_migrations(conn, migrations)


async def test_a_failing_migration_leaves_nothing_half_done(fresh_db):
    conn = await fresh_db()
    migrations = load_migrations()
    broken = migrations + [Migration(len(migrations) + 1, "broken",
                                     "CREATE TABLE half_done (id int); SELECT no_such_function();")]
    with pytest.raises(Exception, match="no_such_function"):
        await apply_migrations(conn, broken)
    assert await schema_version(conn) == len(migrations)
    assert not await conn.fetchval("SELECT to_regclass('half_done') IS NOT NULL")


async def test_an_admin_dsn_migrates_and_leaves_the_app_user_rows_but_not_the_schema(settings, tmp_path):
    """db.admin_dsn owns the tables; db.dsn's user (what every node holds) reads and writes rows, nothing more."""
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg
    import yaml
    from pydantic import SecretStr

    from tests.support.stack import run_lap
    from lap.sinks.store import migrate

    name, role = f"mig_{uuid.uuid4().hex[:10]}", f"app_{uuid.uuid4().hex[:10]}"
    owner = urlsplit(settings.db.dsn.get_secret_value())
    admin_dsn = urlunsplit(owner._replace(path=f"/{name}"))
    app_dsn = urlunsplit(owner._replace(path=f"/{name}", netloc=f"{role}:app-pw@{owner.hostname}:{owner.port}"))
    admin = await connect(settings, database="postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        split = settings.model_copy(update={"db": settings.db.model_copy(
            update={"dsn": SecretStr(app_dsn), "admin_dsn": SecretStr(admin_dsn)})})
        assert await migrate(split) == [m.version for m in load_migrations()]  # and creates the user
        assert await admin.fetchval("SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = $1", role) is False
        # the app user alone: the schema is current, so it asks for no DDL
        app_only = settings.model_copy(update={"db": settings.db.model_copy(update={"dsn": SecretStr(app_dsn)})})
        assert await migrate(app_only) == []
        app = await asyncpg.connect(app_dsn)
        try:
            assert await app.fetchval("SELECT count(*) FROM batches") == 0  # reads
            for ddl in ("CREATE TABLE mine (a int)", "ALTER TABLE api_keys ADD COLUMN z int", "DROP TABLE batches",
                        "TRUNCATE dead_letters", "DELETE FROM schema_migrations"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.execute(ddl)
            # a release with a new migration, run with the rows' user only: a clear refusal, nothing half done
            newer = load_migrations() + [Migration(len(load_migrations()) + 1, "next", "CREATE TABLE nxt (a int);")]
            with pytest.raises(MigrationError, match="may not make them"):
                await apply_migrations(app, newer)
            assert await schema_version(app) == len(load_migrations())
        finally:
            await app.close()
        # the real command, with the app user's DSN: a key is written and read back
        config = yaml.safe_load(Path(str(settings.data_dir.parent / "lap.yaml")).read_text())
        config["db"] = {"dsn": app_dsn}
        path = tmp_path / "lap.yaml"
        path.write_text(yaml.safe_dump(config))
        token = run_lap("keys", "create", "--tenant", "split", "--role", "reader", config=path).stdout.strip()
        listed = run_lap("keys", "list", "--tenant", "split", config=path).stdout
        assert token and "reader" in listed and token not in listed
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
