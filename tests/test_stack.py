"""The running stack: health, status, loopback-only binding, supervision and durable restarts."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from contextlib import AsyncExitStack

import httpx
import psutil

from lap.aws import open_client
from lap.sinks.store import connect
from tests.support.stack import run_lap


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def healthz(settings) -> httpx.Response:
    return httpx.get(f"{settings.api_url}/healthz", timeout=10)


def test_healthz_reports_every_dependency(lap_up):
    reply = healthz(lap_up.settings)
    assert reply.status_code == 200
    body = reply.json()
    assert body["ok"] is True
    assert set(body["components"]) == {"postgres", "kinesis", "s3", "opensearch"}
    assert all(c["ok"] for c in body["components"].values())
    assert "open shards" in body["components"]["kinesis"]["detail"]
    assert httpx.get(f"{lap_up.settings.api_url}/v1/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{lap_up.settings.api_url}/openapi.json", timeout=10).json()["info"]["title"] == "LAP Ingest API"


def test_status_shows_components_serve_apps_and_shards(lap_up):
    result = run_lap("status", "--json", config=lap_up.config)
    report = json.loads(result.stdout)
    assert report["supervisor_pid"] == lap_up.pid
    assert all(c["ok"] for c in report["components"].values())
    apps = report["serve"]["applications"]
    assert {name: app["status"] for name, app in apps.items()} == {
        "ingest": "RUNNING", "output": "RUNNING", "console": "RUNNING", "processing": "RUNNING"}
    assert apps["output"]["route_prefix"] == "/v1" and apps["console"]["route_prefix"] == "/console"
    # at least the 4 shards LAP created (a test may have split one: its parent is then closed)
    assert [s["state"] for s in report["shards"]].count("open") >= 4
    # every open shard has a consumer holding its lease
    assert all(s["consumer"] == "consuming" for s in report["shards"] if s["state"] == "open"), report["shards"]
    assert report["processing_error"] is None and isinstance(report["totals"], dict)
    table = run_lap("status", config=lap_up.config).stdout
    assert "RUNNING" in table and "shardId-000000000003" in table and "events by stage:" in table


def test_stand_ins_listen_on_loopback_only(lap_up):
    for name, info in lap_up.state["stand_ins"].items():
        proc = psutil.Process(info["pid"])
        sockets = [c for p in [proc, *proc.children(recursive=True)] for c in p.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN]
        assert sockets, f"{name} listens nowhere"
        assert {c.laddr.ip for c in sockets} == {"127.0.0.1"}, f"{name} listens on {sockets}"
    api = [c for c in psutil.net_connections("inet")
           if c.status == psutil.CONN_LISTEN and c.laddr.port == lap_up.settings.ray.http_port]
    assert api and {c.laddr.ip for c in api} == {"127.0.0.1"}


def test_every_port_lap_opens_is_on_loopback_but_those_ray_hard_codes(lap_up):
    """LAP's metrics port and Ray's own servers bind 127.0.0.1; the only wider sockets are the ones Ray binds on
    every interface with no setting (HAProxy's stats and metrics ports, each Serve replica's inter-deployment gRPC
    server), which docs/operations.md lists."""
    root = psutil.Process(lap_up.pid)
    tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    wide = []
    for c in psutil.net_connections("inet"):
        if c.status != psutil.CONN_LISTEN or c.pid not in tree or c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
            continue
        try:
            name = " ".join(tree[c.pid].cmdline())
        except psutil.Error:
            continue
        ray_settings = lap_up.settings.ray
        if "haproxy" in name and c.laddr.port in (ray_settings.haproxy_stats_port, ray_settings.haproxy_metrics_port):
            continue
        if name.startswith("ray::ServeReplica") and c.laddr.ip == "::":
            continue
        wide.append((c.laddr.ip, c.laddr.port, name[:60]))
    assert not wide, wide
    metrics = [c for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == lap_up.settings.ray.metrics_port]
    assert metrics and {c.laddr.ip for c in metrics} <= {"127.0.0.1", "::ffff:127.0.0.1"}, metrics


def test_rays_token_file_is_private(lap_up):
    from lap.runner import ray_token_path

    path = ray_token_path()
    assert path.exists(), "Ray made no token file"  # LAP's Ray runs with token authentication
    assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)


def test_ports_of_throughput_mode_are_the_configured_ones(lap_up):
    """HAProxy answers on the API port (loopback); its stats, metrics and Serve's fallback proxy use the ports
    the settings give, so that two LAPs on one machine never collide (docs/operators.md, "Ports")."""
    ray_settings = lap_up.settings.ray
    listening = {c.laddr.port: c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    for port in (ray_settings.http_port, ray_settings.haproxy_stats_port, ray_settings.haproxy_metrics_port,
                 ray_settings.fallback_proxy_port):
        assert port in listening, f"nothing listens on {port}"
    assert psutil.Process(listening[ray_settings.http_port].pid).name() == "haproxy"
    assert listening[ray_settings.fallback_proxy_port].laddr.ip == "127.0.0.1"


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of a process."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:
            pass
    return out


def _pids(lap_up, fragment: str) -> list[int]:
    found = []
    for proc in psutil.Process(lap_up.pid).children(recursive=True):
        try:
            if fragment in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


async def test_the_processing_side_is_background_cpu_work(lap_up, db):
    """Consumers, the index writer, the archive and index stand-ins and the consumers' Postgres backends run
    as SCHED_IDLE; ingest, the stream stand-in and Postgres itself do not (process.background_cpu)."""
    stand_ins = {name: info["pid"] for name, info in lap_up.state["stand_ins"].items()}
    for name in ("opensearch", "s3"):
        assert _policies(stand_ins[name]) == {os.SCHED_IDLE}, name
    for name in ("kinesis", "postgres"):
        assert os.SCHED_IDLE not in _policies(stand_ins[name]), name
    consumers, writers = _pids(lap_up, "ray::ShardConsumer"), _pids(lap_up, "ray::IndexWriter")
    replicas = _pids(lap_up, "ray::ServeReplica:ingest")
    assert consumers and writers and replicas
    for pid in consumers + writers:
        assert _policies(pid) == {os.SCHED_IDLE}, pid
    for pid in replicas:
        assert os.SCHED_IDLE not in _policies(pid), pid
    backends = await db.fetch("SELECT pid, application_name, backend_type FROM pg_stat_activity "
                              "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
    idle = [r["pid"] for r in backends if os.sched_getscheduler(r["pid"]) == os.SCHED_IDLE]
    assert idle and len(idle) < len(backends)  # the consumers' and index writer's, not ingest's or this test's


def test_second_up_on_the_same_data_is_refused(lap_up):
    result = run_lap("up", config=lap_up.config, check=False, timeout=60)
    assert result.returncode == 1
    assert "already running" in result.stderr and "Traceback" not in result.stderr
    assert healthz(lap_up.settings).status_code == 200


def test_up_refuses_an_api_port_that_another_lap_holds(lap_up, tmp_path):
    from tests.support.stack import write_config

    config = write_config(tmp_path / "other", ray={"http_port": lap_up.settings.ray.http_port})
    result = run_lap("up", config=config, check=False, timeout=120)
    assert result.returncode == 1
    assert f"port {lap_up.settings.ray.http_port} (ray.http_port)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "other" / "data" / "postgres").exists()  # refused before starting anything


def test_healthz_is_503_while_a_dependency_does_not_answer(lap_up):
    pid = lap_up.state["stand_ins"]["opensearch"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # frozen: it accepts connections but never answers
    try:
        reply = wait_for(lambda: (r := healthz(lap_up.settings)).status_code == 503 and r, 30, "a 503")
        body = reply.json()
        assert body["ok"] is False and body["components"]["opensearch"]["ok"] is False
        assert body["components"]["postgres"]["ok"] is True
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: healthz(lap_up.settings).status_code == 200, 30, "healthz back to 200")


async def _write_marks(settings) -> dict:
    """Put one record, one object and one row into the stand-ins; returns how to find them."""
    mark = uuid.uuid4().hex
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        put = await kinesis.put_record(StreamName=settings.stream.name, Data=mark.encode(), PartitionKey=mark)
        s3 = await open_client(stack, settings, "s3")
        await s3.put_object(Bucket=settings.archive.bucket, Key=f"test/{mark}", Body=mark.encode())
    conn = await connect(settings)
    try:
        await conn.execute("INSERT INTO tenants (name) VALUES ($1)", f"t-{mark[:20]}")
    finally:
        await conn.close()
    return {"mark": mark, "shard": put["ShardId"], "seq": put["SequenceNumber"]}


async def _read_marks(settings, marks: dict) -> dict:
    found = {}
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        it = await kinesis.get_shard_iterator(StreamName=settings.stream.name, ShardId=marks["shard"],
                                              ShardIteratorType="AT_SEQUENCE_NUMBER",
                                              StartingSequenceNumber=marks["seq"])
        records = await kinesis.get_records(ShardIterator=it["ShardIterator"], Limit=1)
        found["kinesis"] = records["Records"][0]["Data"] == marks["mark"].encode()
        s3 = await open_client(stack, settings, "s3")
        obj = await s3.get_object(Bucket=settings.archive.bucket, Key=f"test/{marks['mark']}")
        found["s3"] = await obj["Body"].read() == marks["mark"].encode()
    conn = await connect(settings)
    try:
        found["postgres"] = await conn.fetchval("SELECT count(*) FROM tenants WHERE name = $1",
                                                f"t-{marks['mark'][:20]}") == 1
    finally:
        await conn.close()
    return found


async def test_data_survives_restarts_of_kinesis_s3_and_postgres(lap_up):
    settings = lap_up.settings
    marks = await _write_marks(settings)
    # A hard crash (SIGKILL) of each durable stand-in, then a clean stop (SIGTERM/SIGINT) of each:
    # the supervisor restarts it, and everything written before is still there.
    for how in (signal.SIGKILL, None):
        for name in ("kinesis", "s3", "postgres"):
            old_pid = lap_up.state["stand_ins"][name]["pid"]
            sig = how or (signal.SIGINT if name == "postgres" else signal.SIGTERM)
            os.kill(old_pid, sig)
            wait_for(lambda: lap_up.state["stand_ins"][name]["pid"] != old_pid, 60, f"{name} restarted")
        wait_for(lambda: healthz(settings).status_code == 200, 60, "healthz 200 after restarts")
        assert await _read_marks(settings, marks) == {"kinesis": True, "s3": True, "postgres": True}


def test_serve_status_cli_sees_the_applications_running(lap_up):
    """What an operator types: `serve status` (Ray's token mode must be on in the client)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    serve_cli = str(Path(sys.executable).with_name("serve"))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    result = subprocess.run([serve_cli, "status", "-a", lap_up.settings.dashboard_url],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    apps = yaml.safe_load(result.stdout)["applications"]
    assert {name: app["status"] for name, app in apps.items()} == {
        "ingest": "RUNNING", "output": "RUNNING", "console": "RUNNING", "processing": "RUNNING"}
