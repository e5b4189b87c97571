"""Capacity and cost model: shards, nodes and monthly cost at a given event rate, from measured figures.

Inputs, each traced to where it comes from:

- CPU per event of LAP's own processes (ingest replicas with the Serve proxy,
  shard consumers, Ray's overhead) and of Postgres, and the audit rows' bytes
  per event: the JSON of `benchmarks/ingest.py`, `benchmarks/pipeline.py` and
  `benchmarks/reconcile.py` in benchmarks/results/;
- the stream's records per event and bytes per event, and the bytes of an
  archived event (gzip JSON lines): measured here, by running LAP's own record
  and archive code over `lap.samples` events. A request's events are packed one
  record per shard they touch (docs/stream-records.md), so the more shards, the
  fewer events share a record: both are measured at the shard count each rate
  needs (a few rounds, until the count settles);
- AWS limits and prices, and the few rates this machine cannot measure
  (OpenSearch on real nodes): ASSUMPTIONS below, each named, to be replaced by
  yours.

It prints the tables of docs/capacity.md (markdown) and writes the JSON.

    .venv/bin/python benchmarks/capacity.py [--rates 10000 100000 1000000 15000000] [--json benchmarks/results/capacity.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOURS_PER_MONTH = 730
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600

# Not measurable here: AWS's published limits and on-demand list prices (us-east-1), and a planning
# rate for OpenSearch. Replace them with your own region's prices and your own load tests.
ASSUMPTIONS = {
    "cpu_utilization_target": 0.6,            # plan nodes to run at 60% CPU, for bursts and a lost node
    "worker_vcpus": 4,                        # c7i.xlarge, as in cluster.yaml
    "worker_usd_per_hour": 0.1785,
    "head_usd_per_hour": 0.2016,              # m7i.xlarge: GCS, dashboard, no replicas
    "shard_records_per_s": 1000,              # Kinesis write limit per shard (records)
    "shard_bytes_per_s": 1_048_576,           # ... and bytes
    "shard_headroom": 1.25,                   # uneven partition keys and bursts
    "shard_usd_per_hour": 0.015,              # provisioned mode
    "put_payload_unit_bytes": 25_600,
    "put_payload_usd_per_million": 0.014,
    "s3_put_usd_per_1000": 0.005,
    "s3_standard_usd_per_gb_month": 0.023,
    "archive_objects_per_shard_per_s": 2.0,   # a batch a second, one tenant: its archive object and its receipts
    "opensearch_docs_per_s_per_data_node": 5000,  # planning figure for r6g.xlarge.search, replica 1: load-test it
    "opensearch_node_usd_per_hour": 0.335,    # r6g.xlarge.search
    "opensearch_index_days": 30,              # the index keeps 30 days; the archive keeps everything
    "opensearch_bytes_per_doc_factor": 2.0,   # stored source plus fields, times one replica... of the record size
    "opensearch_gp3_usd_per_gb_month": 0.122,
    "rds_vcpus_per_instance_max": 64,         # db.r7g.16xlarge, the largest single Postgres
    "rds_usd_per_vcpu_hour": 0.12,            # db.r7g on-demand, per vCPU, single-AZ
    "rds_multi_az_factor": 2.0,
    "rds_gp3_usd_per_gb_month": 0.115,
    "dedup_window_days": 1,                   # process.dedup_window_s: receipts and dedup buckets kept that long
    "events_per_learner_day": 50,             # a learner's events in a course on a day share aggregate rows: yours?
    "events_per_envelope": 50,                # what sensors send per POST /caliper: fewer events per record below it
}


def load(name: str) -> dict:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path.relative_to(ROOT)} is missing: run the benchmark that writes it first") from None


def _sample(events: int = 5000):
    import orjson

    from lap.caliper import parse_envelope
    from lap.samples import EventFactory, envelope

    per = int(ASSUMPTIONS["events_per_envelope"])
    items = EventFactory(seed=3, learners=100_000, courses=2000).events(events)
    return [parse_envelope(orjson.dumps(envelope(items[i:i + per]))) for i in range(0, events, per)]


_SAMPLE: list = []
_STREAM_SIZES: dict[int, dict[str, float]] = {}


def stream_sizes(shards: int) -> dict[str, float]:
    """Records per event and bytes per event in the stream when the stream has `shards` shards (LAP's own packing)."""
    if shards not in _STREAM_SIZES:
        from lap.auth import Principal
        from lap.ingest.records import pack
        from lap.stream.shard_map import ShardMap

        if not _SAMPLE:
            _SAMPLE.extend(_sample())
        top = 2**128
        shard_map = ShardMap([{"ShardId": f"s{i}", "HashKeyRange": {"StartingHashKey": str(i * top // shards)},
                               "SequenceNumberRange": {}} for i in range(shards)])
        principal = Principal(key_id="k", tenant="capacity", role="sensor", sensor=None)
        records = size = events = 0
        for envelope in _SAMPLE:
            packed = pack(envelope, principal, datetime(2026, 11, 27, tzinfo=UTC), "r", shard_map, 1_048_576)
            records += len(packed.records)
            size += sum(r.size for r in packed.records)
            events += len(envelope.items)
        _STREAM_SIZES[shards] = {"records_per_event": records / events, "bytes_per_event": size / events,
                                 "bytes_per_record": size / records}
    return _STREAM_SIZES[shards]


def measured_sizes() -> dict[str, float]:
    """Bytes of an archived event (gzipped as one batch) and of one-event records (LAP 0.1), through LAP's code."""
    from lap.process.batch import archive_line, decode
    from lap.stream import record_format

    if not _SAMPLE:
        _SAMPLE.extend(_sample())
    old_format = [orjson_dumps({"meta": {"event_id": i.id, "tenant": "capacity", "sensor": e.sensor, "key_id": "k",
                                         "received_at": "2026-11-27T00:00:00.000000Z", "request_id": "r",
                                         "data_version": e.data_version, "kind": i.kind, "type": i.type,
                                         "action": i.action, "learner": i.learner, "course": i.course},
                                "item": i.doc}) for e in _SAMPLE for i in e.items]
    lines = [record_format.event_line({"event_id": i.id, "kind": i.kind}, i.doc) for e in _SAMPLE for i in e.items]
    record = record_format.encode({"tenant": "capacity", "received_at": "2026-11-27T00:00:00.000000Z"}, lines[:50])
    stream = [record_format.StreamRecord(1, record)]
    decoded, _ = decode(stream)
    archive = gzip.compress(b"\n".join(archive_line(d, "shardId-000000000000") for d in decoded))
    return {"one_event_record_bytes": sum(map(len, old_format)) / len(old_format),
            "archive_gz_bytes": len(archive) / len(decoded)}


def orjson_dumps(value) -> bytes:
    import orjson

    return orjson.dumps(value)


def shards_needed(rate: float, a: dict[str, float]) -> tuple[int, dict[str, float]]:
    """Shards for `rate`, by Kinesis's record and byte limits, at the packing that shard count gives."""
    shards = 4
    for _ in range(8):  # more shards -> fewer events per record -> more records: settle on a fixed point
        sizes = stream_sizes(shards)
        records_per_s = rate * sizes["records_per_event"]
        bytes_per_s = rate * sizes["bytes_per_event"]
        need = math.ceil(max(records_per_s / a["shard_records_per_s"], bytes_per_s / a["shard_bytes_per_s"])
                         * a["shard_headroom"])
        if need == shards:
            break
        shards = max(1, need)
    return shards, stream_sizes(shards)


def inputs() -> dict[str, float]:
    ingest = load("ingest.json")
    pipeline = load("pipeline.json")
    cpu = pipeline["cpu_us_per_event"]
    database = pipeline["database"]
    return {
        "ingest_cpu_us": ingest["ingest_cpu_us_per_event"],  # HAProxy + ingest replicas, beside processing
        "consumer_cpu_us": cpu["shard consumers"],
        "ray_cpu_us": cpu["other (Ray, supervisor)"],
        "postgres_cpu_us": cpu["postgres"],
        # what the database keeps: per learner-day (aggregates), and the rest per event (per batch and minute
        # rows, and a batch's fingerprints for about an hour), from a generated course
        "aggregate_bytes_per_learner_day": database["bytes_per_learner_day"],
        "other_db_bytes_per_event": database["other_bytes_per_event"],
        "index_doc_bytes": pipeline["index"]["doc_bytes"],
        "receipt_bytes_per_event": load("reconcile.json")["fill"]["receipt_bytes_per_event"],
        **measured_sizes(),
    }


def plan(rate: float, m: dict[str, float], a: dict[str, float]) -> dict[str, float]:
    """Everything at `rate` events/s."""
    shards, sizes = shards_needed(rate, a)
    node_cpu_us = m["ingest_cpu_us"] + m["consumer_cpu_us"] + m["ray_cpu_us"]
    vcpus = rate * node_cpu_us / 1e6 / a["cpu_utilization_target"]
    workers = max(2, math.ceil(vcpus / a["worker_vcpus"]))
    units_per_record = math.ceil(sizes["bytes_per_record"] / a["put_payload_unit_bytes"])
    records_per_s = rate * sizes["records_per_event"]
    kinesis = (shards * a["shard_usd_per_hour"] * HOURS_PER_MONTH
               + records_per_s * SECONDS_PER_MONTH * units_per_record / 1e6 * a["put_payload_usd_per_million"])
    events_month = rate * SECONDS_PER_MONTH
    archive_gb_month = events_month * m["archive_gz_bytes"] / 1e9
    window_s = a["dedup_window_days"] * 86_400
    # receipts and saved dedup buckets are kept for the dedup window; the archive for good (a month counted here)
    audit_gb = rate * window_s * (m["receipt_bytes_per_event"] + 8) / 1e9
    s3 = (shards * a["archive_objects_per_shard_per_s"] * SECONDS_PER_MONTH / 1000 * a["s3_put_usd_per_1000"]
          + (archive_gb_month + audit_gb) * a["s3_standard_usd_per_gb_month"])
    dedup_memory_gb = rate * window_s * 8 / 1e9
    os_nodes = max(2, math.ceil(rate / a["opensearch_docs_per_s_per_data_node"]))
    os_gb = (rate * 86_400 * a["opensearch_index_days"] * m["index_doc_bytes"]
             * a["opensearch_bytes_per_doc_factor"] / 1e9)
    opensearch = os_nodes * a["opensearch_node_usd_per_hour"] * HOURS_PER_MONTH + os_gb * a["opensearch_gp3_usd_per_gb_month"]
    pg_vcpus = max(2, math.ceil(rate * m["postgres_cpu_us"] / 1e6 / a["cpu_utilization_target"]))
    pg_bytes_per_event = (m["aggregate_bytes_per_learner_day"] / a["events_per_learner_day"]
                          + m["other_db_bytes_per_event"])
    pg_gb_month = events_month * pg_bytes_per_event / 1e9  # what a month adds (aggregates are kept)
    pg_instances = math.ceil(pg_vcpus / a["rds_vcpus_per_instance_max"])
    postgres = (pg_vcpus * a["rds_usd_per_vcpu_hour"] * a["rds_multi_az_factor"] * HOURS_PER_MONTH
                + pg_gb_month * a["rds_gp3_usd_per_gb_month"] * a["rds_multi_az_factor"])
    nodes = workers * a["worker_usd_per_hour"] * HOURS_PER_MONTH + a["head_usd_per_hour"] * HOURS_PER_MONTH
    total = nodes + kinesis + s3 + opensearch + postgres
    billion = events_month / 1e9
    return {
        "events_per_s": rate, "shards": shards, "events_per_record": round(1 / sizes["records_per_event"], 2),
        "stream_bytes_per_event": round(sizes["bytes_per_event"]), "worker_vcpus": round(vcpus, 1), "worker_nodes": workers,
        "shards_per_worker_node": round(shards / workers, 1), "dedup_memory_gb": round(dedup_memory_gb, 1),
        "opensearch_data_nodes": os_nodes, "opensearch_gb": round(os_gb), "postgres_vcpus": pg_vcpus,
        "postgres_instances": pg_instances, "postgres_gb_per_month": round(pg_gb_month),
        "postgres_bytes_per_event": round(pg_bytes_per_event, 1), "archive_gb_per_month": round(archive_gb_month),
        "audit_objects_gb": round(audit_gb),
        "usd_per_month": {"ray_nodes": round(nodes), "kinesis": round(kinesis), "s3": round(s3),
                          "opensearch": round(opensearch), "postgres": round(postgres), "total": round(total)},
        "usd_per_billion_events": round(total / billion, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[10_000, 100_000, 1_000_000, 15_000_000])
    parser.add_argument("--json", type=Path, default=RESULTS / "capacity.json")
    args = parser.parse_args()

    m = inputs()
    a = ASSUMPTIONS
    plans = [plan(rate, m, a) for rate in args.rates]
    node_cpu_us = m["ingest_cpu_us"] + m["consumer_cpu_us"] + m["ray_cpu_us"]

    print("Measured inputs (benchmarks/results/*.json, and sizes measured by this script):\n")
    print("| input | value |\n|---|---:|")
    for name, value in m.items():
        print(f"| {name} | {value:,.1f} |")
    print("\nThe stream, by shard count (50-event envelopes, one record per shard a request touches):\n")
    print("| shards | events per record | bytes per record | stream bytes per event |\n|---:|---:|---:|---:|")
    for shards in sorted(set([4, 64, 1024] + [p["shards"] for p in plans])):
        z = stream_sizes(shards)
        print(f"| {shards:,} | {1 / z['records_per_event']:.2f} | {z['bytes_per_record']:,.0f} "
              f"| {z['bytes_per_event']:,.0f} |")
    print(f"\nOne {a['worker_vcpus']}-vCPU node at {a['cpu_utilization_target']:.0%} carries "
          f"{a['worker_vcpus'] * a['cpu_utilization_target'] * 1e6 / node_cpu_us:,.0f} events/s of ingest + "
          "processing.\n")
    print("| events/s | shards | events per record | worker vCPUs | worker nodes | dedup memory GB "
          "| OpenSearch data nodes | Postgres vCPUs (instances) | Postgres GB added a month | archive GB/month "
          "| receipts + dedup GB in S3 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in plans:
        print(f"| {p['events_per_s']:,.0f} | {p['shards']:,} | {p['events_per_record']} | {p['worker_vcpus']:,} "
              f"| {p['worker_nodes']:,} | {p['dedup_memory_gb']:,} "
              f"| {p['opensearch_data_nodes']:,} | {p['postgres_vcpus']:,} ({p['postgres_instances']}) "
              f"| {p['postgres_gb_per_month']:,} | {p['archive_gb_per_month']:,} | {p['audit_objects_gb']:,} |")
    print("\n| events/s | Ray nodes | Kinesis | S3 | OpenSearch | Postgres | total $/month | $ per billion events |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in plans:
        c = p["usd_per_month"]
        print(f"| {p['events_per_s']:,.0f} | {c['ray_nodes']:,} | {c['kinesis']:,} | {c['s3']:,} | {c['opensearch']:,} "
              f"| {c['postgres']:,} | {c['total']:,} | {p['usd_per_billion_events']:,} |")

    write_report(args.json, {"benchmark": "capacity", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "machine": machine(), "measured": m, "assumptions": a, "plans": plans,
                             "stream_by_shards": {str(k): v for k, v in sorted(_STREAM_SIZES.items())}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
