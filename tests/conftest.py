"""One real LAP for the whole session: `lap up --detach` on free ports in a temporary folder.

The session's stack is started and stopped by the real `lap` command, so the
teardown itself checks `lap down`: every process that `lap up` started must
be gone, and every port closed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from lap.settings import Settings, load_settings

LAP = [sys.executable, "-m", "lap"]

# Ray 2.60 clusters take token auth; Ray reads this when imported, so it is set before any test imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# LAP's local Ray runs at 127.0.0.1 (lap/runner.py); a driver joins it only with this set, read on import too.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def free_port() -> int:
    from lap.local.ports import free_port as pick

    return pick()


def write_config(folder: Path, **extra) -> Path:
    """A config for a private LAP in `folder`, on free ports."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    from lap.local.ports import free_ports

    ports = free_ports(10)
    config = {
        "data_dir": str(folder / "data"),
        "local": dict(zip(("postgres_port", "kinesis_port", "s3_port", "opensearch_port"), ports)),
        "ray": {"http_port": ports[4], "dashboard_port": ports[5], "metrics_port": ports[6],
                "haproxy_stats_port": ports[7], "haproxy_metrics_port": ports[8], "fallback_proxy_port": ports[9]},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path = folder / "lap.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_lap(*args: str, config: Path | None = None, timeout: float = 120, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
    argv = [*LAP, *args] + (["--config", str(config)] if config else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def listening_ports(settings: Settings) -> list[int]:
    stand_ins = {"postgres": settings.local.postgres_port, "kinesis": settings.local.kinesis_port,
                 "s3": settings.local.s3_port, "opensearch": settings.local.opensearch_port}
    ports = [stand_ins[name] for name in settings.local_services()]
    ports += [settings.ray.http_port, settings.ray.dashboard_port, settings.ray.metrics_port,
              settings.ray.haproxy_stats_port, settings.ray.haproxy_metrics_port, settings.ray.fallback_proxy_port]
    open_ = []
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                open_.append(port)
    return open_


def assert_all_gone(processes: list[psutil.Process], settings: Settings, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not listening_ports(settings):
            return
        time.sleep(0.5)
    names = [f"{p.pid}:{p.name()}" for p in alive]
    raise AssertionError(f"left behind: processes {names}, listening ports {listening_ports(settings)}")


def pytest_collection_modifyitems(items):
    """The lifecycle test starts its own LAP: run it before the session's LAP exists."""
    items.sort(key=lambda item: 0 if item.path.name == "test_lifecycle.py" else 1)


@dataclass
class RunningLap:
    config: Path
    settings: Settings

    @property
    def state(self) -> dict:
        return json.loads((self.settings.run_dir / "state.json").read_text())

    @property
    def pid(self) -> int:
        return self.state["pid"]


@pytest.fixture(scope="session")
def lap_up() -> RunningLap:
    folder = Path(tempfile.mkdtemp(prefix="lap-test-"))
    # Small limits so that the tests can reach them; a short key cache so that revocations show quickly.
    # Quick processing cycles, so that the pipeline tests drain in seconds.
    config = write_config(folder, auth={"key_cache_ttl_s": 0.5},
                          limits={"max_body_bytes": 1024 * 1024, "max_record_bytes": 32 * 1024},
                          process={"batch_max_wait_s": 0.5, "coordinator_interval_s": 1.0, "idle_poll_s": 0.1,
                                   "max_poll_s": 0.5, "lease_ttl_s": 10.0})
    started = time.monotonic()
    result = run_lap("up", "--detach", config=config, timeout=400)
    assert "LAP is up" in result.stdout, result.stdout + result.stderr
    print(f"\nlap up --detach took {time.monotonic() - started:.1f} s")
    running = RunningLap(config=config, settings=load_settings(config))
    children = descendants(running.pid)
    yield running
    children = children + descendants(running.pid) + [psutil.Process(running.pid)]
    down = run_lap("down", config=config, timeout=200)
    assert "LAP stopped." in down.stderr, down.stderr  # by itself, not killed
    assert_all_gone(children, running.settings)
    log = (running.settings.log_dir / "lap.log").read_text()
    assert "did not stop within" not in log and "LAP stopped" in log, log[-3000:]
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(lap_up: RunningLap) -> Settings:
    return lap_up.settings


@pytest.fixture(scope="session")
def tokens(lap_up: RunningLap) -> dict[str, str]:
    """Keys for the tests, made with the real CLI: a sensor, a sensor bound to one IRI, a reader, a slow one."""
    def create(*args: str) -> str:
        return run_lap("keys", "create", *args, config=lap_up.config).stdout.strip()

    return {
        "sensor": create("--tenant", "acme", "--role", "sensor"),
        "bound": create("--tenant", "acme", "--role", "sensor", "--sensor", "https://example.edu/sensors/bound"),
        "reader": create("--tenant", "acme", "--role", "reader"),
        "slow": create("--tenant", "acme", "--role", "sensor", "--rate", "0.5"),
        "other_tenant": create("--tenant", "globex", "--role", "sensor"),
    }


@pytest.fixture(scope="session")
def ray_driver(lap_up: RunningLap):
    """This test process joined to the session's Ray, to reach the processing actors."""
    import ray

    ray.init(address=lap_up.state["ray_address"], namespace="lap", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
async def db(settings: Settings):
    from lap.sinks.store import connect

    conn = await connect(settings)
    yield conn
    await conn.close()
