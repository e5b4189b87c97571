"""API keys against the real Postgres stand-in: only hashes stored; revoked and unknown keys fail."""

from __future__ import annotations

import pytest

from lap.auth import KeyRequestError, create_key, hash_token, list_keys, revoke_key, verify_token
from tests.support.stack import run_lap


async def test_created_key_verifies_and_only_its_hash_is_stored(db):
    key_id, token = await create_key(db, "tenant-a", "sensor", "https://lms.example.edu/sensors/1")
    assert token.startswith(f"lap_{key_id}_") and len(token) > 40

    principal = await verify_token(db, token)
    assert principal is not None
    assert (principal.key_id, principal.tenant, principal.role, principal.sensor) == (
        key_id, "tenant-a", "sensor", "https://lms.example.edu/sensors/1")

    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert bytes(row["token_hash"]) == hash_token(token)
    # Nowhere in the keys or tenants tables does the secret part of the token appear.
    secret = token.split("_", 2)[2]
    dumped = await db.fetchval(
        "SELECT string_agg(t::text, ' ') FROM (SELECT k::text AS t FROM api_keys k "
        "UNION ALL SELECT n::text FROM tenants n) rows")
    assert key_id in dumped and secret not in dumped


async def test_unknown_malformed_and_revoked_keys_fail(db):
    key_id, token = await create_key(db, "tenant-b", "reader")
    assert await verify_token(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await verify_token(db, "lap_000000000000_nope") is None
    assert await verify_token(db, "Bearer " + token) is None
    assert await verify_token(db, "") is None
    assert await verify_token(db, token) is not None

    assert await revoke_key(db, key_id) is True
    assert await verify_token(db, token) is None
    assert await revoke_key(db, key_id) is False  # already revoked
    assert await revoke_key(db, "no-such-key") is False


async def test_list_hides_revoked_unless_asked(db):
    kept, _ = await create_key(db, "tenant-c", "admin")
    gone, _ = await create_key(db, "tenant-c", "reader")
    await revoke_key(db, gone)
    active = {k.id for k in await list_keys(db, "tenant-c")}
    everything = {k.id for k in await list_keys(db, "tenant-c", include_revoked=True)}
    assert active == {kept}
    assert everything == {kept, gone}


@pytest.mark.parametrize("tenant,role,sensor,message", [
    ("bad tenant", "sensor", None, "invalid tenant"),
    ("t", "owner", None, "invalid role"),
    ("t", "reader", "https://x.example/s", "only applies"),
    ("t", "sensor", "not an iri", "invalid sensor IRI"),
])
async def test_bad_key_requests_are_refused(db, tenant, role, sensor, message):
    before = await db.fetchval("SELECT count(*) FROM api_keys")
    with pytest.raises(KeyRequestError, match=message):
        await create_key(db, tenant, role, sensor)
    assert await db.fetchval("SELECT count(*) FROM api_keys") == before


async def test_cli_prints_only_the_token_and_revoke_takes_effect(lap_up, db):
    created = run_lap("keys", "create", "--tenant", "cli-tenant", "--role", "sensor",
                      "--sensor", "https://lms.example.edu/s", config=lap_up.config)
    token = created.stdout.strip()
    assert created.stdout == token + "\n"  # nothing else on stdout, so `$(lap keys create ...)` works
    principal = await verify_token(db, token)
    assert principal is not None and principal.tenant == "cli-tenant"

    listed = run_lap("keys", "list", "--tenant", "cli-tenant", config=lap_up.config)
    assert principal.key_id in listed.stdout and token not in listed.stdout + listed.stderr
    assert token.split("_", 2)[2] not in (lap_up.settings.log_dir / "lap.log").read_text()

    run_lap("keys", "revoke", principal.key_id, config=lap_up.config)
    assert await verify_token(db, token) is None
    again = run_lap("keys", "revoke", principal.key_id, config=lap_up.config, check=False)
    assert again.returncode == 1 and "no active key" in again.stderr

    bad = run_lap("keys", "create", "--tenant", "x", "--role", "reader", "--sensor", "https://s",
                  config=lap_up.config, check=False)
    assert bad.returncode == 1 and "only applies" in bad.stderr and bad.stdout == ""


def test_cli_explains_when_postgres_is_not_reachable(tmp_path):
    from tests.support.stack import free_port, write_config

    config = write_config(tmp_path / "nothing-running")
    config.write_text(config.read_text() + f"db:\n  dsn: postgresql://lap:pw@127.0.0.1:{free_port()}/lap\n")
    result = run_lap("keys", "create", "--tenant", "t", "--role", "reader", config=config, check=False)
    assert result.returncode == 1
    assert "cannot use Postgres at 127.0.0.1" in result.stderr
    assert "pw@" not in result.stderr and "Traceback" not in result.stderr
