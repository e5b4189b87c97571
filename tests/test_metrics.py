"""LAP's metrics as Ray's Prometheus endpoint serves them, after real traffic on the session's LAP."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lap.process.coordinator import COORDINATOR
from tests.support.traffic import delete_documents
from tests.support.traffic import envelopes, make_events, new_tenant, send, wait_for


def scrape(settings) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of the `ray_lap_*` samples."""
    text = httpx.get(settings.metrics_url, timeout=10).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_lap_"):
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels) -> float | None:
    """The sum of the samples of `name` carrying these labels; None if there is none."""
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    return sum(found) if found else None


async def eventually(settings, check, timeout: float = 90) -> dict:
    """Ray's agent exports every few seconds: scrape until `check(samples)` holds."""
    deadline = time.monotonic() + timeout
    samples: dict = {}
    while time.monotonic() < deadline:
        samples = scrape(settings)
        if check(samples):
            return samples
        await asyncio.sleep(2)
    raise AssertionError(f"metrics never showed it; last ray_lap_* samples: {sorted(samples)}")


async def test_metrics_show_ingest_processing_and_reconcile(lap_up, settings, db, ray_driver):
    tenant, sensor = new_tenant(lap_up)
    events = make_events(120)
    send(settings, sensor, envelopes(events))
    refused = httpx.post(f"{settings.api_url}/caliper", content=b"{}", timeout=30,
                         headers={"Authorization": f"Bearer {sensor}", "Content-Type": "application/json"})
    assert refused.status_code == 400
    await wait_for(db, tenant, {"accepted": 120, "archived": 120, "indexed": 120}, timeout=180, settings=settings)
    shards = {r["shard_id"] for r in await db.fetch("SELECT shard_id FROM shard_checkpoints WHERE NOT finished")}

    coordinator = ray_driver.get_actor(COORDINATOR)
    end = datetime.now(timezone.utc) + timedelta(minutes=1)
    missing = ray_driver.get(coordinator.report_reconcile.remote(end), timeout=120)
    assert missing[tenant] == {"archive": 0, "aggregate": 0, "index": 0}

    samples = await eventually(settings, lambda s: value(s, "ray_lap_reconcile_complete", tenant=tenant) == 1)
    assert value(samples, "ray_lap_ingest_events_total") >= 120
    assert value(samples, "ray_lap_ingest_refusals_total", status="400") >= 1
    assert {labels["shard"] for labels, _ in samples["ray_lap_consumer_lag_ms"]} >= shards
    assert value(samples, "ray_lap_batch_commit_seconds_count") > 0
    assert value(samples, "ray_lap_batch_commit_seconds_sum") > 0
    assert {labels["shard"] for labels, _ in samples["ray_lap_index_backlog_batches"]} >= shards
    assert value(samples, "ray_lap_reconcile_missing", tenant=tenant, stage="index") == 0

    # a document lost from the index shows in the reconcile metrics
    await delete_documents(settings, tenant, [events[0]["id"]])
    missing = ray_driver.get(coordinator.report_reconcile.remote(end), timeout=120)
    assert missing[tenant] == {"archive": 0, "aggregate": 0, "index": 1}
    samples = await eventually(settings, lambda s: value(s, "ray_lap_reconcile_complete", tenant=tenant) == 0)
    assert value(samples, "ray_lap_reconcile_missing", tenant=tenant, stage="index") == 1
