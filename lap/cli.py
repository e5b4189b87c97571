"""The `lap` command. Every failure ends in one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from lap import __version__
from lap.settings import ConfigError, Settings, load_settings

config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="YAML settings file (also LAP_CONFIG). LAP_ environment variables override it.",
)


def _settings(config_file: Path | None) -> Settings:
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if config_file is not None:
        # Ray workers and a detached `lap up` read the same file.
        os.environ["LAP_CONFIG"] = str(Path(config_file).resolve())
    return settings


@click.group()
@click.version_option(__version__, prog_name="lap")
def main() -> None:
    """LAP, the Learning Analytics Platform."""


# --- up / down / status ----------------------------------------------------------


@main.command()
@config_option
@click.option("--detach", is_flag=True, help="Run in the background; stop it with `lap down`.")
def up(config_file: Path | None, detach: bool) -> None:
    """Start the local stand-ins, Ray and the Serve applications."""
    from lap.local.processes import StandInError
    from lap.runner import RunError, run_detached, run_foreground
    from lap.sinks.store import MigrationError

    settings = _settings(config_file)
    _configure_logging()
    try:
        if detach:
            run_detached(settings, config_file)
            return
        code = run_foreground(settings)
    except (RunError, StandInError, MigrationError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@config_option
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait before killing it.")
def down(config_file: Path | None, timeout: float) -> None:
    """Stop a running `lap up` (detached or not) and everything it started."""
    from lap.runner import running_pid, stop_pid

    settings = _settings(config_file)
    pid = running_pid(settings)
    if pid is None:
        click.echo(f"LAP is not running for {settings.data_dir}.", err=True)
        return
    click.echo(f"stopping LAP (pid {pid})...", err=True)
    if stop_pid(pid, timeout):
        click.echo("LAP stopped.", err=True)
        return
    time.sleep(1)
    if running_pid(settings) is None:
        raise click.ClickException(f"LAP did not stop within {timeout:.0f} s and was killed")
    raise click.ClickException(f"LAP (pid {pid}) did not stop, even when killed")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
def status(config_file: Path | None, as_json: bool) -> None:
    """Health of each component, the Serve applications and the stream's shards."""
    from lap.runner import running_pid

    settings = _settings(config_file)
    report = asyncio.run(_status(settings))
    report["supervisor_pid"] = running_pid(settings)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_status(settings, report)
    healthy = all(c["ok"] for c in report["components"].values()) and all(
        a["status"] == "RUNNING" for a in report["serve"].get("applications", {}).values()
    ) and not report["serve"].get("error")
    sys.exit(0 if healthy else 1)


async def _status(settings: Settings) -> dict:
    from lap.health import HealthChecker
    from lap.stores import Stores
    from lap.stream.kinesis import list_shards

    checker = HealthChecker(settings)
    try:
        health = await checker.check()
    finally:
        await checker.close()
    shards: list[dict] = []
    shards_error = None
    try:
        async with Stores(settings, kinesis=True) as stores:
            for shard in await asyncio.wait_for(list_shards(stores.kinesis, settings), 5):
                seq = shard["SequenceNumberRange"]
                shards.append({
                    "shard": shard["ShardId"],
                    "state": "closed" if seq.get("EndingSequenceNumber") else "open",
                    "parent": shard.get("ParentShardId"),
                    "hash_range": f"{shard['HashKeyRange']['StartingHashKey'][:6]}..",
                })
    except Exception as exc:
        shards_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    processing, processing_error = {}, None
    try:
        processing = await asyncio.wait_for(_processing(settings), 5)
    except Exception as exc:
        processing_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    for shard in shards:
        shard.update(processing.get("shards", {}).get(shard["shard"], {}))
    return {
        "components": {name: comp.model_dump() for name, comp in health.components.items()},
        "serve": _serve_status(settings),
        "shards": shards,
        "shards_error": shards_error,
        "totals": processing.get("totals", {}),
        "processing_error": processing_error,
    }


async def _processing(settings: Settings) -> dict:
    """Per shard: the consumer's state, lag and counts (the audit actor's view); totals per stage."""
    from lap.audit.shards import consumer_state, shard_view
    from lap.sinks.store import connect

    conn = await connect(settings)
    try:
        rows = await shard_view(conn, settings.stream.name)
        totals = {r["stage"]: int(r["n"]) for r in await conn.fetch(
            "SELECT stage, sum(events) AS n FROM stage_counts GROUP BY stage")}
    finally:
        await conn.close()
    shards = {r["shard_id"]: {"consumer": consumer_state(r), "lag_ms": r["lag_ms"], "archived": r["archived"],
                              "indexed": r["indexed"], "duplicates": r["duplicates"]} for r in rows}
    return {"shards": shards, "totals": totals}


def _ray_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    from lap.runner import protect_ray_token, ray_token_path

    path = ray_token_path()
    protect_ray_token()
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _serve_status(settings: Settings) -> dict:
    """Serve's own view, from the Ray dashboard's REST API (what `serve status` reads)."""
    request = urllib.request.Request(f"{settings.dashboard_url}/api/serve/applications/")
    token = _ray_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return {"error": f"Ray dashboard answered {err.code}"}
    except (OSError, ValueError):
        return {"error": f"Ray dashboard not reachable at {settings.dashboard_url}"}
    apps = {}
    for name, app in (body.get("applications") or {}).items():
        deployments = {d: info.get("status") for d, info in (app.get("deployments") or {}).items()}
        apps[name] = {"status": app.get("status"), "route_prefix": app.get("route_prefix"), "deployments": deployments}
    return {"applications": apps}


def _print_status(settings: Settings, report: dict) -> None:
    pid = report["supervisor_pid"]
    click.echo(f"LAP for {settings.data_dir}: " + (f"supervisor pid {pid}" if pid else "no local `lap up` running"))
    click.echo(f"API {settings.api_url}   Ray dashboard {settings.dashboard_url}")
    click.echo(f"Metrics {settings.metrics_url} (ray_lap_*: ingest rate, refusals, lag, commits, backlog, "
               "reconcile)\n")
    click.echo(f"{'component':<12} {'status':<6} {'ms':>7}  detail")
    for name, comp in report["components"].items():
        click.echo(f"{name:<12} {'ok' if comp['ok'] else 'DOWN':<6} {comp['latency_ms']:>7.1f}  {comp['detail']}")
    click.echo("")
    serve = report["serve"]
    if serve.get("error"):
        click.echo(f"serve: {serve['error']}")
    else:
        click.echo(f"{'application':<12} {'status':<14} {'route':<8} deployments")
        for name, app in serve["applications"].items():
            deps = ", ".join(f"{d}={s}" for d, s in app["deployments"].items())
            click.echo(f"{name:<12} {app['status']:<14} {app['route_prefix'] or '-':<8} {deps}")
    click.echo("")
    if report["shards_error"]:
        click.echo(f"shards: {report['shards_error']}")
    else:
        click.echo(f"stream {settings.stream.name}: {len(report['shards'])} shards")
        click.echo(f"  {'shard':<22} {'state':<7} {'parent':<22} {'hash range':<10} {'consumer':<10} "
                   f"{'lag ms':>7} {'archived':>10} {'indexed':>10}")
        for s in report["shards"]:
            lag = "-" if s.get("lag_ms") is None else s["lag_ms"]
            click.echo(f"  {s['shard']:<22} {s['state']:<7} {s['parent'] or '-':<22} {s['hash_range']:<10} "
                       f"{s.get('consumer', '-'):<10} {lag:>7} {s.get('archived', 0):>10} {s.get('indexed', 0):>10}")
    click.echo("")
    if report["processing_error"]:
        click.echo(f"processing: {report['processing_error']}")
    else:
        totals = report["totals"]
        stages = ("acknowledged", "accepted", "archived", "aggregated", "indexed", "duplicates", "describes")
        click.echo("events by stage: " + ", ".join(f"{k} {totals.get(k, 0):,}" for k in stages))
        click.echo("(the shard counts are since the audit actor started; the stage totals are the committed ones)")


# --- keys ------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (bearer tokens)."""


def _db_call(settings: Settings, fn):
    """Run `fn(conn)` against Postgres with the schema up to date; clear errors, never the DSN."""
    import asyncpg

    from lap.sinks.store import MigrationError, connect, migrate

    async def run():
        await migrate(settings)
        conn = await connect(settings)
        try:
            return await fn(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        dsn = urlparse(settings.db.dsn.get_secret_value() if settings.db.dsn else "")
        where = f"{dsn.hostname}:{dsn.port or 5432}/{dsn.path.lstrip('/')}"
        hint = " Is `lap up` running?" if settings.mode == "local" else ""
        raise click.ClickException(f"cannot use Postgres at {where}: {type(exc).__name__}: {exc}.{hint}") from None


@keys.command("create")
@config_option
@click.option("--tenant", required=True, help="Tenant the key belongs to (created if new).")
@click.option("--role", required=True, type=click.Choice(["sensor", "reader", "admin"]))
@click.option("--sensor", default=None, help="Sensor IRI, for sensor keys.")
@click.option("--rate", type=float, default=None,
              help="Requests per second allowed for this key (default: limits.requests_per_s).")
def keys_create(config_file: Path | None, tenant: str, role: str, sensor: str | None, rate: float | None) -> None:
    """Print a new bearer token on stdout (shown once; only its hash is kept)."""
    from lap.auth import KeyRequestError, create_key

    settings = _settings(config_file)
    try:
        key_id, token = _db_call(settings, lambda conn: create_key(conn, tenant, role, sensor, rate))
    except KeyRequestError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created key {key_id} (tenant {tenant}, role {role}); the token is shown once:", err=True)
    click.echo(token)


@keys.command("list")
@config_option
@click.option("--tenant", default=None, help="Only this tenant's keys.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys_list(config_file: Path | None, tenant: str | None, include_revoked: bool) -> None:
    """List keys (never their tokens)."""
    from lap.auth import list_keys

    settings = _settings(config_file)
    rows = _db_call(settings, lambda conn: list_keys(conn, tenant, include_revoked))
    click.echo(f"{'id':<14} {'tenant':<16} {'role':<7} {'rate/s':>8}  {'created':<20} {'revoked':<20} sensor")
    for k in rows:
        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if k.revoked_at else "-"
        rate = f"{k.rate_per_s:g}" if k.rate_per_s else "default"
        click.echo(f"{k.id:<14} {k.tenant:<16} {k.role:<7} {rate:>8}  {k.created_at:%Y-%m-%d %H:%M:%S}  "
                   f"{revoked:<20} {k.sensor or '-'}")


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_file: Path | None, key_id: str) -> None:
    """Revoke a key by its id; requests with its token fail from then on."""
    from lap.auth import revoke_key

    settings = _settings(config_file)
    if not _db_call(settings, lambda conn: revoke_key(conn, key_id)):
        raise click.ClickException(f"no active key with id {key_id!r} (see `lap keys list --all`)")
    click.echo(f"revoked key {key_id}", err=True)


def _erasure(config_file: Path | None, request):
    """Ask for an erasure (`request(pool)`: its tombstone and whether it is new) and run it here, with progress
    bars, unless it is done or running elsewhere: (its row, how it ended or None)."""
    from lap.audit.erasure import ErasureBusy, ErasureRefused, run_unless_elsewhere

    settings = _settings(config_file)
    progress = _progress_bars() or (lambda step, done, total: None)

    async def work(stores):
        row, created = await request(stores.pool)
        return await run_unless_elsewhere(settings, stores.pool, stores.s3, stores.search, row, created, progress)

    try:
        return _run_store_work(settings, work)
    except (ErasureRefused, ErasureBusy) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def tenant() -> None:
    """Tenants: delete one, with everything it holds."""


@tenant.command("delete")
@config_option
@click.argument("name")
@click.option("--yes", is_flag=True, help="do not ask for a confirmation")
def tenant_delete(config_file: Path | None, name: str, yes: bool) -> None:
    """Delete a tenant: revoke its keys, erase its events, figures, index and audit trail from every store, and
    keep a tombstone of its counts. Its name is not given out again."""
    from lap.audit.erasure import request_tenant_deletion

    if not yes:
        click.confirm(f"Delete tenant {name} and everything it holds? This cannot be undone", abort=True)
    row, job = _erasure(config_file, lambda pool: request_tenant_deletion(pool, name, "cli"))
    if job is None:
        click.echo(f"tenant {name} already deleted ({row['job_id']}, {row['status']})")
        return
    if job["status"] != "done":
        raise click.ClickException(f"deletion {row['job_id']} stopped: {job['error']} (run it again to finish)")
    click.echo(f"deleted tenant {name} ({row['job_id']}): " + ", ".join(f"{k} {v:,}" for k, v in job["counts"].items()))


# --- reconcile / replay ------------------------------------------------------------


class IsoTime(click.ParamType):
    """An ISO 8601 date-time (a missing zone means UTC), or a date (its 00:00 UTC)."""

    name = "ISO-8601"

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date-time such as 2026-11-27T08:00:00Z", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _window_options(command):
    command = click.option("--end", required=True, type=IsoTime(), help="received until (excluded)")(command)
    command = click.option("--start", required=True, type=IsoTime(),
                           help="received from (included), e.g. 2026-11-27T08:00:00Z or 2026-11-27")(command)
    return click.option("--tenant", required=True, help="the tenant whose events are checked")(command)


def _window(tenant: str, start: datetime, end: datetime, sensor: str | None = None):
    from lap.audit.reconcile import WindowError, checked_window

    try:
        return checked_window(tenant, start, end, sensor, names=("--start", "--end"))
    except WindowError as exc:
        raise click.ClickException(str(exc)) from None


async def _with_stores(settings: Settings, work):
    """Run `work(stores)` with LAP's stores open, closing them after."""
    from lap.stores import Stores

    async with Stores(settings, pool=True, s3=True, kinesis=True, search=True) as stores:
        return await work(stores)


def _run_store_work(settings: Settings, work):
    try:
        return asyncio.run(_with_stores(settings, work))
    except (OSError, asyncio.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach LAP's stores ({type(exc).__name__}: {exc}); is LAP up?") from None


def _progress_bars():
    """progress(step, done, total) drawing one bar per step on a terminal's stderr; None elsewhere (no stray
    lines in a pipe or a log)."""
    if not sys.stderr.isatty():
        return None
    bars: dict[str, Any] = {}

    def progress(step: str, done: int, total: int) -> None:
        bar = bars.get(step)
        if bar is None or bar.finished or done < bar.done:  # a step may run again (reconcile reads receipts twice)
            bar = bars[step] = click.progressbar(length=max(total, 1), label=f"{step:<12}", file=sys.stderr)
            bar.__enter__()
            bar.done = 0
        bar.update(done - bar.done)
        bar.done = done
        if done >= total:
            bar.__exit__(None, None, None)
            bar.finished = True

    return progress


def _print_reconciliation(result) -> None:
    click.echo(f"accepted {result.accepted:,}  duplicates {result.duplicates:,}  describes {result.describes:,}  "
               f"quarantined {result.quarantined:,}")
    click.echo(f"archived {result.archived:,}  aggregated {result.aggregated:,}  indexed {result.indexed:,}")
    click.echo("missing  " + "  ".join(f"{stage} {n:,}" for stage, n in result.missing.items())
               + f"  retention_lost {result.retention_lost:,}  pending {result.pending:,}")
    if result.erased:
        click.echo(f"erased {result.erased:,}: events of erased learners, taken out of every stage (`lap erasures`)")
    if result.dead_lettered:
        click.echo(f"dead-lettered {result.dead_lettered:,}: in records a consumer could not process, kept aside "
                   "(GET /v1/audit/dead-letters says why); `lap replay` stores them once the cause is fixed")
    if result.complete:
        click.echo("complete: every accepted event is in every stage")
    elif result.in_flight:
        click.echo(f"NOT complete yet, nothing missing so far: {result.pending:,} events still in the stream, "
                   f"{result.index_pending:,} waiting for the index (`--wait SECONDS` waits for them)")
    else:
        click.echo("NOT complete: `lap replay` can repair what is missing"
                   + (" (the pending events are not missing: they are still on their way)" if result.pending else ""))


# `lap reconcile`'s exit codes: scripts tell "something is missing" from "not there yet"
EXIT_COMPLETE, EXIT_MISSING, EXIT_IN_FLIGHT = 0, 1, 3


@main.command()
@config_option
@_window_options
@click.option("--sensor", default=None, help="only this sensor's events")
@click.option("--ids", "with_ids", is_flag=True, help="also list the missing event ids per stage")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, max=86400), default=0, show_default=True,
              help="while nothing is missing but events are still on their way, ask again for up to this many "
                   "seconds")
def reconcile(config_file: Path | None, tenant: str, start: datetime, end: datetime, sensor: str | None,
              with_ids: bool, as_json: bool, wait_s: float) -> None:
    """Count each stage's events for a window of received time, and what is missing.

    Exit 0 when complete, 1 when events are missing (or dead-lettered), 3 when
    nothing is missing but events are still on their way (pending, or waiting
    for the index): with --wait, that is asked again until it settles.
    """
    from lap.audit.reconcile import Reconciler, ReconcileRefused

    settings = _settings(config_file)
    window = _window(tenant, start, end, sensor)

    progress = _progress_bars()

    async def work(stores):
        reconciler = Reconciler(settings, stores.pool, stores.s3, stores.search, progress)
        deadline = time.monotonic() + wait_s
        while True:
            result = await reconciler.run(window, with_ids=with_ids, limit=10_000_000)
            if not result.in_flight or time.monotonic() >= deadline:
                return result
            if sys.stderr.isatty():
                click.echo(f"waiting: {result.pending:,} pending, {result.index_pending:,} waiting for the index",
                           err=True)
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    try:
        result = _run_store_work(settings, work)
    except ReconcileRefused as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        _print_reconciliation(result)
        for stage, ids in (result.missing_ids or {}).items():
            for event_id in ids:
                click.echo(f"missing from {stage}: {event_id}")
    sys.exit(EXIT_COMPLETE if result.complete else EXIT_IN_FLIGHT if result.in_flight else EXIT_MISSING)


@main.command()
@config_option
@_window_options
@click.option("--stages", default="archive,aggregate,index", show_default=True,
              help="comma-separated: archive, aggregate, index")
@click.option("--source", type=click.Choice(["archive", "stream"]), default="archive", show_default=True,
              help="where missing events are read again from")
def replay(config_file: Path | None, tenant: str, start: datetime, end: datetime, stages: str, source: str) -> None:
    """Put back into each stage what reconcile finds missing in the window; a second run changes nothing."""
    from lap.audit.jobs import ReplayJobs, record_job
    from lap.audit.replay import STAGES, new_replay_id

    settings = _settings(config_file)
    window = _window(tenant, start, end)
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if not chosen or unknown:
        raise click.ClickException(f"--stages takes {', '.join(STAGES)}; got {stages!r}")
    progress = _progress_bars() or (lambda step, done, total: None)

    replay_id = new_replay_id()

    async def work(stores):  # a job like POST /v1/audit/replay's: its row shows how it went
        await record_job(stores.pool, replay_id, window, chosen, source)
        return await ReplayJobs(settings, stores.pool, stores.s3, stores.search, stores.kinesis).run(
            replay_id, window, chosen, source, report=progress)

    job = _run_store_work(settings, work)
    if job["status"] != "done":
        raise click.ClickException(f"replay {replay_id} failed: {job['error']}")
    result = job["result"]
    click.echo(f"replay {replay_id} (GET /v1/audit/replay/{replay_id} shows it too)")
    click.echo("replayed: " + ", ".join(f"{k} {v:,}" for k, v in result["replayed"].items()))
    after = result["after"]
    click.echo("after: missing " + ", ".join(f"{k} {v:,}" for k, v in after["missing"].items())
               + ("; complete" if after["complete"] else "; nothing missing, events still on their way "
                  "(`lap reconcile --wait` waits for them)" if after["nothing_missing"] and not after["dead_lettered"]
                  else "; NOT complete"))
    in_flight = after["nothing_missing"] and not after["dead_lettered"]
    sys.exit(EXIT_COMPLETE if after["complete"] else EXIT_IN_FLIGHT if in_flight else EXIT_MISSING)


@main.command()
@config_option
@click.option("--tenant", required=True)
@click.option("--learner", required=True, help="the learner's IRI, as the events name them")
@click.option("--yes", is_flag=True, help="do not ask for a confirmation")
def erase(config_file: Path | None, tenant: str, learner: str, yes: bool) -> None:
    """Erase a learner: their events from the archive, the index, the aggregates and the receipts, for good.

    A tombstone (the learner's hashed IRI, when, the counts) is kept, and their
    events that arrive later are dropped. Running it again says it is done."""
    from lap.audit.erasure import request_erasure

    if not yes:
        click.confirm(f"Erase every event of {learner} in tenant {tenant}? This cannot be undone", abort=True)
    row, job = _erasure(config_file, lambda pool: request_erasure(pool, tenant, learner, "cli"))
    if job is None:
        if row["status"] == "done":
            click.echo(f"already erased by {row['job_id']} on {row['finished_at']:%Y-%m-%d %H:%M} UTC: nothing to do")
        else:
            click.echo(f"already being erased by {row['job_id']} (GET /v1/erasures/{row['job_id']} shows how far)")
        return
    if job["status"] != "done":
        raise click.ClickException(f"erasure {row['job_id']} stopped: {job['error']} (it is resumed by the API, "
                                   "or run `lap erase` again)")
    counts = job["counts"]
    click.echo(f"erased {counts.get('events', 0):,} events of the learner ({row['job_id']}): "
               + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "events"))


@main.command()
@config_option
@click.option("--tenant", required=True)
@click.option("--learner", required=True, help="the learner's IRI, as the events name them")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True, path_type=Path), default=None,
              help="the file to write (default: standard output)")
def export(config_file: Path | None, tenant: str, learner: str, out_path: Path | None) -> None:
    """Write a learner's data as JSON lines: their archived events, then their aggregate rows, then a summary
    (a subject-access request)."""
    from lap.output.export import export_learner

    settings = _settings(config_file)
    progress = _progress_bars()
    target = out_path.with_name(out_path.name + ".part") if out_path else None

    async def work(stores):
        out = target.open("wb") if target else sys.stdout.buffer
        try:
            return await export_learner(settings, stores.pool, stores.s3, tenant, learner, out, progress)
        finally:
            if target:
                out.close()
            else:
                out.flush()

    counts = _run_store_work(settings, work)
    if not any(counts.values()):
        if target:
            target.unlink(missing_ok=True)
        raise click.ClickException(f"LAP holds no data of {learner} in tenant {tenant}")
    if target:
        target.replace(out_path)  # whole, or not there
        click.echo(f"wrote {counts['events']:,} events, {counts['learner_days']:,} learner-days and "
                   f"{counts['learner_day_actions']:,} action rows to {out_path}", err=True)


@main.command()
@config_option
@click.option("--tenant", required=True)
@click.option("--json", "as_json", is_flag=True)
def erasures(config_file: Path | None, tenant: str, as_json: bool) -> None:
    """The tenant's erasures (tombstones): when, by which key, and what each store gave up."""
    settings = _settings(config_file)

    async def work(stores):
        async with stores.pool.acquire() as conn:
            return await conn.fetch("SELECT job_id, learner_hash, status, requested_at, requested_by, finished_at, "
                                    "counts FROM erasures WHERE tenant = $1 ORDER BY id", tenant)

    rows = _run_store_work(settings, work)
    if as_json:
        click.echo(json.dumps([dict(r, counts=json.loads(r["counts"])) for r in rows], indent=2, default=str))
        return
    if not rows:
        click.echo(f"no erasures in tenant {tenant}")
    for r in rows:
        what = f"learner {r['learner_hash'][:16]}…" if r["learner_hash"] else "the whole tenant"
        counts = json.loads(r["counts"])
        click.echo(f"{r['job_id']}  {r['status']:<7}  {r['requested_at']:%Y-%m-%d %H:%M}  by {r['requested_by']}  "
                   f"{what}  events {counts.get('events', 0):,}")


@main.command()
@config_option
@click.option("--secret-id", default=None, help="The Secrets Manager secret the nodes read (aws mode).")
@click.option("--target-group", default=None, help="The ARN of the load balancer's target group (aws mode).")
@click.option("--node-role", default=None,
              help="The IAM role to simulate (aws mode; default: the role this machine runs under).")
def preflight(config_file: Path | None, secret_id: str | None, target_group: str | None,
              node_role: str | None) -> None:
    """Check a deployment before it takes traffic: one line per check; exit 1 if any fails."""
    from lap.preflight import run_preflight

    def report(check) -> None:
        click.echo(f"{check.status:<5} {check.name:<14} {check.detail}")

    ok = run_preflight(config_file, secret_id, target_group, node_role, report)
    click.echo("ready for traffic" if ok else "NOT ready: fix the lines marked FAIL, then run lap preflight again")
    sys.exit(0 if ok else 1)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "aiobotocore", "opensearch", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
