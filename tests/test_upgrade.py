"""A rolling upgrade: `serve deploy` of a changed config while sensors send. Nothing acknowledged is lost."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from lap.runner import serve_config
from tests.support.sensors import Sensor
from tests.support.api import get, key
from tests.support.traffic import assert_exact, make_events, new_tenant, wait_for

APPS = ("ingest", "output", "processing")


def serve_deploy(settings, config: dict, folder: Path) -> None:
    """What an operator types, with the config written to a file."""
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    result = subprocess.run([serve_cli, "deploy", str(path), "-a", settings.dashboard_url], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stdout + result.stderr


def replica_pids(ray_driver) -> dict[str, set[int]]:
    """The pids of each application's live replicas."""
    from ray.util.state import list_actors

    pids: dict[str, set[int]] = {app: set() for app in APPS}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        for app in APPS:
            if actor.class_name.startswith(f"ServeReplica:{app}:"):
                pids[app].add(actor.pid)
    return pids


def wait_settled(ray_driver, old: dict[str, set[int]], timeout: float = 240) -> dict[str, set[int]]:
    """Every application RUNNING on replicas none of which is in `old`; returns their pids."""
    from ray import serve

    deadline = time.monotonic() + timeout
    states, pids = {}, {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {name: (str(apps[name].status), {d: dict(s.replica_states) for d, s in apps[name].deployments.items()})
                  for name in APPS if name in apps}
        settled = len(states) == len(APPS) and all(
            status.endswith("RUNNING") and all(set(r) == {"RUNNING"} for r in deployments.values())
            for status, deployments in states.values())
        if settled:
            pids = replica_pids(ray_driver)
            if all(pids[app] and pids[app].isdisjoint(old[app]) for app in APPS):
                return pids
        time.sleep(1)
    raise AssertionError(f"Serve did not settle on new replicas within {timeout:.0f} s: {states}, {pids} vs {old}")


async def test_serve_deploy_of_a_changed_config_loses_nothing(lap_up, settings, db, ray_driver, tmp_path):
    started = datetime.now(timezone.utc)
    tenant, token = new_tenant(lap_up)
    original = serve_config(settings)
    changed = copy.deepcopy(original)
    for app in changed["applications"]:  # a new environment for every application: new replicas throughout
        app.setdefault("runtime_env", {}).setdefault("env_vars", {})["LAP_TEST_RELEASE"] = "2"
    before = replica_pids(ray_driver)
    assert all(before.values()), before

    sensor = Sensor(settings, token, make_events(40_000))  # more than it can send before it is stopped
    sensor.start()
    after = before
    try:
        time.sleep(3)
        serve_deploy(settings, changed, tmp_path)
        after = wait_settled(ray_driver, before)
        sent_during_upgrade = len(sensor.acknowledged)
        time.sleep(3)  # and traffic goes on on the new replicas
    finally:
        sensor.stop.set()
        sensor.join(120)
    try:
        assert not sensor.is_alive()
        assert set(sensor.statuses) <= {200, 429, 503}, sensor.statuses
        assert not sensor.transport_errors, sensor.transport_errors[:3]
        assert len(sensor.acknowledged) > sent_during_upgrade > 0

        acknowledged = sensor.acknowledged
        stages = await wait_for(db, tenant, {"archived": len(acknowledged), "aggregated": len(acknowledged),
                                             "indexed": len(acknowledged)}, timeout=180, settings=settings)
        # a 503 may come after some of an envelope's events were put: their retry is counted as duplicates
        assert stages["accepted"] - stages.get("duplicates", 0) == len(acknowledged)
        await assert_exact(settings, db, tenant, acknowledged)
        span = {"start": (started - timedelta(minutes=1)).isoformat(),
                "end": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()}
        report = get(settings, key(lap_up, tenant, "reader"), "/audit/reconcile", **span).json()
        assert report["complete"] is True, report
    finally:
        serve_deploy(settings, original, tmp_path)  # the session's LAP goes back to its own config
        wait_settled(ray_driver, after)
