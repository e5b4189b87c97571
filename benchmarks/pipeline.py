"""End to end on the local stack: a sustained load through /caliper, then the time until it is all processed.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder),
with the index writer off, and:

1. sends envelopes of 50 realistic events from a separate load process for
   --seconds (bounded by --max-requests too);
2. waits until every accepted event is archived and aggregated (the committed
   `stage_counts`), sampling the consumers' lag and the RSS of every process
   of the stack once a second;
3. index phase: starts the IndexWriter (as the Pipeline deployment would) for
   --index-seconds and reports the documents it indexed per second.

Why the index runs on its own: the OpenSearch stand-in keeps every document in
memory (~10-30 KB each) and indexes a few thousand per second on one core, so
indexing a whole run would dominate the box and the memory. Its document count
is bounded by the index phase's duration.

    .venv/bin/python benchmarks/pipeline.py [--seconds 60] [--connections 16] [--index-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lap, machine, start_lap, write_private_config, write_report  # noqa: E402
from ingest import load_process, pct  # noqa: E402

TARGETS = {"processed_per_s": 5_000, "drain_s": 15}


def _kind(proc: psutil.Process) -> str:
    text = " ".join(proc.cmdline()) or proc.name()
    for needle, kind in (("kinesalite", "kinesis"), ("s3rver", "s3"), ("osmem", "opensearch"),
                         ("postgres", "postgres"), ("ServeReplica:ingest", "ingest replicas"),
                         ("ShardConsumer", "shard consumers"), ("IndexWriter", "index writer"),
                         ("ProxyActor", "serve proxy")):
        if needle in text:
            return kind
    return "other (Ray, supervisor)"


def cpu_by_kind(supervisor: int) -> dict[str, float]:
    """CPU seconds so far of every process of the stack, by kind."""
    totals: dict[str, float] = {}
    try:
        procs = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return totals
    for proc in procs:
        try:
            times = proc.cpu_times()
            kind = _kind(proc)
        except psutil.Error:
            continue
        totals[kind] = totals.get(kind, 0.0) + times.user + times.system
    return totals


def stack_rss(supervisor: int) -> int:
    """Resident bytes of the supervisor and everything under it (stand-ins, Ray and its workers)."""
    total = 0
    try:
        procs = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


async def read_progress(settings) -> tuple[dict[str, int], int | None]:
    from lap.sinks.store import connect

    conn = await connect(settings)
    try:
        stages = {r["stage"]: int(r["n"]) for r in await conn.fetch(
            "SELECT stage, sum(events) AS n FROM stage_counts GROUP BY stage")}
        lag = await conn.fetchval("SELECT max(lag_ms) FROM shard_status")
    finally:
        await conn.close()
    return stages, lag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=20_000, help="upper bound on requests sent")
    parser.add_argument("--index-seconds", type=float, default=20, help="how long the index phase runs")
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = parser.parse_args()

    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-pipeline-"))
    config = write_private_config(folder, process={"index_enabled": False})
    settings = load_settings(config)
    if not start_lap(config):
        return 1
    samples: list[dict] = []
    cpu_before = cpu_after = {}
    try:
        token = lap("keys", "create", "--tenant", "bench", "--role", "sensor", config=config).stdout.strip()
        state = json.loads((settings.run_dir / "state.json").read_text())
        supervisor = state["pid"]

        queue: multiprocessing.Queue = multiprocessing.Queue()
        loader = multiprocessing.Process(target=load_process, args=(
            f"{settings.api_url}/caliper", token, args.seconds, args.connections, args.events_per_envelope,
            args.max_requests, queue))
        print(f"load for {args.seconds:.0f} s, then drain...", file=sys.stderr, flush=True)
        started = time.monotonic()
        cpu_before = cpu_by_kind(supervisor)
        loader.start()
        load_result = None
        load_ended = None
        drained_at = None
        while True:
            stages, lag = asyncio.run(read_progress(settings))
            now = time.monotonic()
            samples.append({"t": round(now - started, 1), "stages": stages, "lag_ms": lag,
                            "rss": stack_rss(supervisor)})
            if load_result is None and not queue.empty():
                load_result = queue.get()
                loader.join(30)
                load_ended = now
            if load_result is not None:
                accepted = stages.get("accepted", 0)
                expected = load_result["statuses"].get(200, 0) * args.events_per_envelope
                if accepted >= expected and stages.get("archived", 0) >= accepted \
                        and stages.get("aggregated", 0) >= accepted:
                    drained_at = now
                    cpu_after = cpu_by_kind(supervisor)
                    break
                if now - load_ended > args.drain_timeout:
                    break
            time.sleep(1.0)

        index = index_phase(settings, state["ray_address"], args.index_seconds)
    finally:
        lap("down", config=config)
        shutil.rmtree(folder, ignore_errors=True)

    ok = load_result["statuses"].get(200, 0)
    events = ok * args.events_per_envelope
    elapsed = load_result["elapsed"]
    processed = samples[-1]["stages"].get("aggregated", 0)
    drain_s = (drained_at - load_ended) if drained_at else None
    # processed per second: everything committed, over the time from the first request to the drain
    total_s = (drained_at - started) if drained_at else None
    lat = load_result["latencies"]
    report = {
        "benchmark": "pipeline",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"seconds": args.seconds, "connections": args.connections,
                   "events_per_envelope": args.events_per_envelope, "index_seconds": args.index_seconds},
        "accepted_events": events,
        "accepted_per_s": round(events / elapsed),
        "ingest_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "errors": sum(n for s, n in load_result["statuses"].items() if s != 200),
        "processed_events": processed,
        "processed_per_s": round(processed / total_s) if total_s else None,
        "max_lag_ms": max((s["lag_ms"] or 0) for s in samples),
        "drain_s": round(drain_s, 1) if drain_s is not None else None,
        "peak_rss_gb": round(max(s["rss"] for s in samples) / 2**30, 2),
        "duplicates": samples[-1]["stages"].get("duplicates", 0),
        "index": index,
        # CPU seconds per 1,000 processed events, by kind of process, from the load's start to the drain
        # (a process that started after the first sample, a consumer say, counts from zero)
        "cpu_s_per_1k_events": {k: round((v - cpu_before.get(k, 0.0)) / processed * 1000, 3)
                                for k, v in sorted(cpu_after.items())} if processed and cpu_after else {},
    }
    rows = [
        ("events accepted", f"{events:,}", ""),
        ("accepted/s (during the load)", f"{report['accepted_per_s']:,}", ""),
        ("processed/s (archived + aggregated)", f"{report['processed_per_s']}",
         f">= {TARGETS['processed_per_s']:,}"),
        ("max consumer lag (ms)", f"{report['max_lag_ms']:,}", ""),
        ("drain after the load stops (s)", f"{report['drain_s']}", f"<= {TARGETS['drain_s']}"),
        ("peak RSS of the stack (GB)", f"{report['peak_rss_gb']}", ""),
        ("ingest p99 (ms) / errors", f"{report['ingest_p99_ms']} / {report['errors']}", ""),
        ("index docs/s (own phase)", f"{index.get('docs_per_s')}", ""),
    ]
    print()
    for name, value, target in rows:
        print(f"{name:<38} {value:>14}   {target}")
    print("\nCPU ms per event, by process: " + ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(report["cpu_s_per_1k_events"].items(), key=lambda kv: -kv[1])))
    write_report(args.json, report | {"samples": samples})
    return 0 if drained_at else 1


def index_phase(settings, ray_address: str, seconds: float) -> dict:
    """Run the IndexWriter for `seconds` over what was archived; documents indexed per second."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from lap.audit.actor import NAMESPACE
    from lap.process.index_writer import INDEX_WRITER, IndexWriter

    ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        before = asyncio.run(read_progress(settings))[0].get("indexed", 0)
        writer = IndexWriter.options(name=INDEX_WRITER, lifetime="detached", get_if_exists=True).remote()
        writer.run.remote()
        print(f"index phase for {seconds:.0f} s...", file=sys.stderr, flush=True)
        time.sleep(seconds)
        after = asyncio.run(read_progress(settings))[0].get("indexed", 0)
        ray.kill(writer, no_restart=True)
    finally:
        ray.shutdown()
    return {"seconds": seconds, "docs": after - before, "docs_per_s": round((after - before) / seconds)}


if __name__ == "__main__":
    sys.exit(main())
