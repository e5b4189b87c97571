"""One real LAP for the whole session: `lap up --detach` on free ports in a temporary folder.

The session's stack is started and stopped by the real `lap` command, so the
teardown itself checks `lap down`: every process that `lap up` started must
be gone, and every port closed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lap.settings import Settings, load_settings
from tests.support.stack import assert_all_gone, descendants, run_lap, write_config

# Ray 2.60 clusters take token auth; Ray reads this when imported, so it is set before any test imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# LAP's local Ray runs at 127.0.0.1 (lap/runner.py); a driver joins it only with this set, read on import too.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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
