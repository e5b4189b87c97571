"""Ingest throughput: a bounded load against POST /caliper, and the stream's raw ceiling in the same run.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder),
creates a sensor key, then:

1. raw: PutRecords of the same kind of records straight to the Kinesis
   stand-in, for --seconds (the ceiling LAP cannot beat);
2. lap: envelopes of --events-per-envelope realistic events (~1 KB each,
   unique ids) from a separate load process, --connections at a time, for
   --seconds;

and prints a table and writes JSON. CPU per event is read from /proc for LAP's
own processes: the Serve proxy (or HAProxy) and the ingest replicas. The
shard consumers run meanwhile, as they always do, reading the same stand-in;
the index writer is off, so that the in-memory OpenSearch stand-in does not
take a core from ingest (benchmarks/pipeline.py measures indexing).

    .venv/bin/python benchmarks/ingest.py [--seconds 20] [--connections 32] [--throughput-mode]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lap, machine, start_lap, write_private_config, write_report  # noqa: E402

from lap.samples import EventFactory, envelope  # noqa: E402

TARGETS = {"events_per_s": 10_000, "p99_ms": 250, "ratio": 0.6, "cpu_us_per_event": 50}


class Bodies:
    """Envelope bodies with fresh event ids on every use, cheap to make at load time."""

    def __init__(self, events_per_envelope: int, templates: int = 64, seed: int = 1):
        factory = EventFactory(seed=seed, learners=5000, courses=200)
        self.templates: list[bytes] = []
        for _ in range(templates):
            events = factory.events(events_per_envelope)
            for event in events:
                event["id"] = "urn:uuid:%s"
            raw = orjson.dumps(envelope(events))
            self.templates.append(raw.replace(b"%", b"%%").replace(b"urn:uuid:%%s", b"urn:uuid:%s"))
        self.per = events_per_envelope
        self.run = uuid.uuid4().hex[:8]
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        n = self.n
        ids = tuple(f"{self.run}-{n >> 12 & 0xffff:04x}-4{n & 0xfff:03x}-8{i:03x}-{n:012x}".encode()
                    for i in range(self.per))
        return self.templates[n % len(self.templates)] % ids


# --- the load process ------------------------------------------------------------


def load_process(url: str, token: str, seconds: float, connections: int, per: int, max_requests: int,
                 out: multiprocessing.Queue) -> None:
    import aiohttp

    async def run():
        bodies = Bodies(per)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        deadline = time.monotonic() + seconds
        sent = 0

        async def worker(session):
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                body = bodies.next()
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except aiohttp.ClientError:
                    status = 0
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1

        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
            started = time.monotonic()
            await asyncio.gather(*(worker(session) for _ in range(connections)))
            elapsed = time.monotonic() - started
        out.put({"latencies": latencies, "statuses": statuses, "elapsed": elapsed})

    asyncio.run(run())


# --- raw ceiling ------------------------------------------------------------------


async def raw_ceiling(settings, seconds: float, per: int, concurrency: int = 4) -> dict:
    """PutRecords straight to the stand-in, records shaped like LAP's, 500 per call."""
    from lap.stream.producer import partition_key_for
    from lap.stream.records_client import RecordsClient

    bodies = Bodies(per, seed=2)
    # Built before the clock starts, so that only the stream's own cost is measured.
    batches = []
    for _ in range(16):
        records = []
        while len(records) < 500:
            for item in orjson.loads(bodies.next())["data"]:
                data = orjson.dumps({"meta": {"event_id": item["id"], "tenant": "bench"}, "item": item})
                records.append({"Data": data, "PartitionKey": partition_key_for(item["actor"]["id"])})
        batches.append(records[:500])
    kinesis = RecordsClient(settings)  # the same lean client as the ingest API
    try:
        deadline = time.monotonic() + seconds
        done = 0
        calls = 0

        async def worker():
            nonlocal done, calls
            while time.monotonic() < deadline:
                calls += 1
                reply = await kinesis.put_records(StreamName=settings.stream.name, Records=batches[calls % 16])
                done += 500 - reply["FailedRecordCount"]

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        return {"records": done, "elapsed": elapsed, "records_per_s": done / elapsed}
    finally:
        await kinesis.close()


# --- CPU of LAP's own processes ---------------------------------------------------


def lap_processes(supervisor_pid: int) -> list[psutil.Process]:
    wanted = ("ray::ProxyActor", "ray::ServeReplica:ingest", "haproxy")
    found = []
    for proc in psutil.Process(supervisor_pid).children(recursive=True):
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        if any(w in text for w in wanted):
            found.append(proc)
    return found


def _label(proc: psutil.Process) -> str:
    text = " ".join(proc.cmdline()) or proc.name()
    return "haproxy" if "haproxy" in text else text.split()[0]


def cpu_by_process(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) so far, per kind of process."""
    totals: dict[str, float] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            totals[_label(proc)] = totals.get(_label(proc), 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return totals


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=20_000, help="upper bound on requests sent")
    parser.add_argument("--throughput-mode", action="store_true", help="Serve with HAProxy (ray.throughput_mode)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args()

    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-ingest-"))
    config = write_private_config(folder, ray={"throughput_mode": args.throughput_mode},
                                  process={"index_enabled": False})
    settings = load_settings(config)
    if not start_lap(config):
        return 1
    try:
        token = lap("keys", "create", "--tenant", "bench", "--role", "sensor", config=config).stdout.strip()
        supervisor = int((settings.run_dir / "lap.pid").read_text().split()[0])

        print(f"raw PutRecords ceiling for {args.seconds:.0f} s...", file=sys.stderr, flush=True)
        raw = asyncio.run(raw_ceiling(settings, args.seconds, args.events_per_envelope))

        procs = lap_processes(supervisor)
        names = sorted({_label(p) for p in procs})
        # Warm up, then measure.
        for seconds in (3.0, args.seconds):
            queue: multiprocessing.Queue = multiprocessing.Queue()
            cpu_before = cpu_by_process(procs)
            loader = multiprocessing.Process(target=load_process, args=(
                f"{settings.api_url}/caliper", token, seconds, args.connections, args.events_per_envelope,
                args.max_requests, queue))
            print(f"load for {seconds:.0f} s...", file=sys.stderr, flush=True)
            loader.start()
            result = queue.get(timeout=seconds + 120)
            loader.join(30)
            cpu_after = cpu_by_process(procs)
            cpu_split = {k: cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0) for k in cpu_after}
            cpu_used = sum(cpu_split.values())
    finally:
        lap("down", config=config)
        shutil.rmtree(folder, ignore_errors=True)

    ok = result["statuses"].get(200, 0)
    events = ok * args.events_per_envelope
    rate = events / result["elapsed"]
    lat = result["latencies"]
    report = {
        "benchmark": "ingest",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"seconds": args.seconds, "connections": args.connections,
                   "events_per_envelope": args.events_per_envelope, "throughput_mode": args.throughput_mode},
        "raw_put_records_per_s": round(raw["records_per_s"]),
        "lap": {
            "events_per_s": round(rate),
            "requests_per_s": round(ok / result["elapsed"], 1),
            "p50_ms": round(pct(lat, 0.50) * 1000, 1),
            "p95_ms": round(pct(lat, 0.95) * 1000, 1),
            "p99_ms": round(pct(lat, 0.99) * 1000, 1),
            "statuses": result["statuses"],
            "errors": sum(n for s, n in result["statuses"].items() if s != 200),
            "cpu_us_per_event": round(cpu_used / events * 1e6, 1) if events else None,
            "cpu_us_per_event_by_process": {k: round(v / events * 1e6, 1) for k, v in cpu_split.items()} if events else {},
            "cpu_processes": names,
        },
    }
    report["ratio_to_raw"] = round(rate / raw["records_per_s"], 2) if raw["records_per_s"] else None
    l = report["lap"]
    rows = [
        ("events/s accepted", f"{l['events_per_s']:,}", f">= {TARGETS['events_per_s']:,}"),
        ("requests/s", f"{l['requests_per_s']:,}", ""),
        ("latency p50 / p95 / p99 (ms)", f"{l['p50_ms']} / {l['p95_ms']} / {l['p99_ms']}", f"p99 <= {TARGETS['p99_ms']}"),
        ("errors", f"{l['errors']} {l['statuses']}", ""),
        ("raw PutRecords ceiling (records/s)", f"{report['raw_put_records_per_s']:,}", ""),
        ("ratio LAP / raw", f"{report['ratio_to_raw']}", f">= {TARGETS['ratio']}"),
        ("CPU µs per event (LAP processes)", f"{l['cpu_us_per_event']}", f"<= {TARGETS['cpu_us_per_event']}"),
    ]
    print()
    for name, value, target in rows:
        print(f"{name:<36} {value:>28}   {target}")
    print("\nCPU µs per event, by process: " + ", ".join(
        f"{k} {v}" for k, v in l["cpu_us_per_event_by_process"].items()))
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
