"""Ingest throughput: an open-loop load against POST /caliper, with the stream's raw ceilings in the same run.

Against a LAP that runs already (`make run`, or a cluster):

    .venv/bin/python benchmarks/ingest.py --url http://127.0.0.1:8000 --key-file bench.key \\
        [--rate 10000] [--duration 60] [--connections 32]

(`lap keys create --tenant bench --role sensor > bench.key` makes the key.)
Without --url it starts a LAP of its own (`lap up --detach` on free ports in a
temporary folder) and creates the key itself.

The load is open loop: envelopes of --events-per-envelope generated events
(unique ids) are due at a fixed rate, whatever the replies; a reply's latency
counts from when its envelope was due, so a slow server cannot hide its queue.
At most --connections requests are in flight. Progress shows every second.

Where LAP runs on this machine (its own, or `make run`: the settings of
--config or LAP_CONFIG tell where its state is), the same run also measures:

1. CPU per event from /proc, per process kind: the Serve proxy or HAProxy and
   the ingest replicas (LAP's ingest), the Kinesis stand-in, the load
   generator itself, and everything else (the shard consumers, Postgres, ...);
2. the stand-in's raw PutRecords ceiling, before the load, into a stream of
   its own that LAP does not consume: one event per record (LAP 0.1's format,
   500 records a call) and LAP's records (format 1, the records of one
   envelope a call, as a quiet ingest replica sends them).

It prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lap, machine, start_lap, write_config, write_report  # noqa: E402

from lap.samples import EventFactory, envelope  # noqa: E402

TARGETS = {"events_per_s": 10_000, "p99_ms": 250, "ingest_cpu_us_per_event": 60, "kinesis_cpu_us_per_event": 15}


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


# --- the load process: open loop -------------------------------------------------------------


def load_process(url: str, token: str, rate: float, seconds: float, connections: int, per: int,
                 out: multiprocessing.Queue, progress: bool) -> None:
    import aiohttp

    async def run():
        bodies = Bodies(per)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        interval = per / rate  # seconds between envelopes
        total = int(seconds / interval)
        slots = asyncio.Semaphore(connections)
        late = 0  # envelopes that waited for a free connection past their due time

        async def one(session, due: float) -> None:
            nonlocal late
            async with slots:
                if time.perf_counter() - due > 0.010:
                    late += 1
                try:
                    async with session.post(url, data=bodies.next(), headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
            latencies.append(time.perf_counter() - due)
            statuses[status] = statuses.get(status, 0) + 1

        conn = aiohttp.TCPConnector(limit=connections)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            started = time.perf_counter()
            cpu_start = time.process_time()
            tasks = []
            shown = started
            for i in range(total):
                due = started + i * interval
                pause = due - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                tasks.append(asyncio.create_task(one(session, due)))
                now = time.perf_counter()
                if progress and now - shown >= 1.0:
                    shown = now
                    ok = statuses.get(200, 0)
                    print(f"\r  {now - started:5.1f} s / {seconds:.0f} s   sent {i + 1:,}   ok {ok:,}   "
                          f"{ok * per / (now - started):,.0f} events/s acknowledged   errors "
                          f"{sum(n for s, n in statuses.items() if s != 200)}   ", end="", file=sys.stderr,
                          flush=True)
            sent_for = time.perf_counter() - started
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_start
        if progress:
            print(file=sys.stderr)
        out.put({"latencies": latencies, "statuses": statuses, "elapsed": elapsed, "sent_for": sent_for,
                 "envelopes": total, "late": late, "cpu_s": cpu})

    asyncio.run(run())


# --- raw ceilings of the stream stand-in -------------------------------------------------------


async def raw_ceilings(settings, seconds: float, per: int, kinesis_proc: psutil.Process | None) -> dict:
    """PutRecords straight to the stand-in: one event per record, then LAP's records; events/s and its CPU.

    Into a stream of its own (as many shards as LAP's, deleted afterwards), so that LAP's consumers neither
    read nor process these records: the figure is the stand-in's own ceiling for writes.
    """
    from contextlib import AsyncExitStack

    from lap.auth import Principal
    from lap.aws import open_client
    from lap.caliper import parse_envelope
    from lap.ingest.records import pack
    from lap.stream.kinesis import ensure_stream
    from lap.stream.producer import partition_key_for
    from lap.stream.records_client import RecordsClient
    from lap.stream.shard_map import ShardMap

    name = f"{settings.stream.name}-bench-raw-{uuid.uuid4().hex[:6]}"
    async with AsyncExitStack() as stack:
        kinesis = await open_client(stack, settings, "kinesis")
        shard_count = len([s for s in (await kinesis.list_shards(StreamName=settings.stream.name))["Shards"]
                           if "EndingSequenceNumber" not in s["SequenceNumberRange"]])
        raw_settings = settings.model_copy(update={"stream": settings.stream.model_copy(
            update={"name": name, "shards": shard_count})})
        await ensure_stream(kinesis, raw_settings)
        client = RecordsClient(raw_settings)  # the same lean client as the ingest API
        try:
            return await _measure_raw(client, name, seconds, per, kinesis_proc, pack, parse_envelope, Principal,
                                      partition_key_for, ShardMap)
        finally:
            await client.close()
            await kinesis.delete_stream(StreamName=name)


async def _measure_raw(client, stream: str, seconds: float, per: int, kinesis_proc, pack, parse_envelope, Principal,
                       partition_key_for, ShardMap) -> dict:
    bodies = Bodies(per, seed=2)
    shards = ShardMap(await client.list_shards(StreamName=stream))
    principal = Principal("bench", "bench", "sensor", None)
    # Built before the clock starts, so that only the stream's own cost is measured.
    one_per_record, lap_calls = [], []
    for _ in range(16):
        call_events = []
        while len(call_events) < 500:
            parsed = parse_envelope(bodies.next())
            packed = pack(parsed, principal, datetime.now(timezone.utc), uuid.uuid4().hex, shards, 1024 * 1024)
            lap_calls.append(([{"Data": r.data, "PartitionKey": r.partition_key,
                                "ExplicitHashKey": r.explicit_hash_key} for r in packed.records], len(parsed.items)))
            for item in parsed.items:
                meta = {"event_id": item.id, "tenant": "bench", "learner": item.learner}
                call_events.append({"Data": orjson.dumps({"meta": meta, "item": item.doc}),
                                    "PartitionKey": partition_key_for(item.learner or item.id)})
        one_per_record.append((call_events[:500], 500))

    async def measure(calls: list[tuple[list[dict], int]], concurrency: int) -> dict:
        deadline = time.monotonic() + seconds
        events = records = 0
        n = 0

        async def worker():
            nonlocal events, records, n
            while time.monotonic() < deadline:
                n += 1
                entries, count = calls[n % len(calls)]
                reply = await client.put_records(StreamName=stream, Records=entries)
                if reply["FailedRecordCount"] == 0:
                    events += count
                    records += len(entries)

        cpu_before = _cpu(kinesis_proc)
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        cpu = _cpu(kinesis_proc) - cpu_before
        return {"events_per_s": round(events / elapsed), "records_per_s": round(records / elapsed),
                "kinesis_cpu_us_per_event": round(cpu / events * 1e6, 1) if events and kinesis_proc else None}

    return {"one_event_per_record": await measure(one_per_record, 4),
            # the records of one envelope per call, as a quiet ingest replica sends them
            "lap_records": await measure(lap_calls, 16)}


# --- CPU of the processes on this machine ---------------------------------------------------------


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


def kind_of(proc: psutil.Process, kinesis_pid: int | None) -> str:
    """Which part of LAP (or of the machine) a process is, for the CPU split."""
    if proc.pid == kinesis_pid:
        return "kinesis stand-in"
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "other"
    if "haproxy" in text:
        return "haproxy"
    if "ray::ProxyActor" in text:
        return "serve proxy"
    if "ray::ServeReplica:ingest" in text:
        return "ingest replicas"
    if "ShardConsumer" in text:
        return "shard consumers"
    if "postgres" in text:
        return "postgres"
    return "other LAP processes"


INGEST_KINDS = ("haproxy", "serve proxy", "ingest replicas")


def local_processes(settings) -> tuple[list[psutil.Process], int | None]:
    """Every process of the local LAP (its supervisor's tree), and the Kinesis stand-in's pid."""
    from lap.runner import read_state, running_pid

    pid = running_pid(settings)
    if pid is None:
        return [], None
    state = read_state(settings) or {}
    kinesis_pid = state.get("stand_ins", {}).get("kinesis", {}).get("pid")
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [], kinesis_pid
    return procs, kinesis_pid


def cpu_by_kind(procs: list[psutil.Process], kinesis_pid: int | None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        kind = kind_of(proc, kinesis_pid)
        totals[kind] = totals.get(kind, 0.0) + t.user + t.system
    return totals


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- the run -----------------------------------------------------------------------------------


def run_load(args, url: str, token: str, seconds: float, progress: bool) -> dict:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    loader = multiprocessing.Process(target=load_process, args=(
        url, token, args.rate, seconds, args.connections, args.events_per_envelope, queue, progress))
    loader.start()
    result = queue.get(timeout=seconds + 120)
    loader.join(30)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="LAP's base URL (default: start a LAP of this benchmark's own)")
    parser.add_argument("--token", help="a sensor key's token (or --key-file)")
    parser.add_argument("--key-file", type=Path, help="a file holding a sensor key's token")
    parser.add_argument("--config", type=Path, help="with --url: the settings of that LAP, if it runs on this machine")
    parser.add_argument("--rate", type=float, default=10_000, help="events/s offered (open loop)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (after a warm-up)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before the measured run")
    parser.add_argument("--connections", type=int, default=32, help="requests in flight at most")
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--raw-seconds", type=float, default=10, help="seconds of each raw ceiling (0: skip)")
    parser.add_argument("--no-index", action="store_true",
                        help="its own LAP only: the index writer off (the in-memory OpenSearch stand-in indexes "
                             "~2-5K documents/s on one core and falls far behind at 10K events/s)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.connections < 1 or args.events_per_envelope < 1:
        parser.error("--rate, --duration, --connections and --events-per-envelope must be positive")
    if args.rate * args.duration / args.events_per_envelope > 2_000_000:
        parser.error("that is over 2,000,000 requests: lower --rate or --duration")

    from lap.settings import ConfigError, load_settings

    folder = None
    try:
        if args.url is None:
            folder = Path(tempfile.mkdtemp(prefix="lap-bench-ingest-"))
            config = write_config(folder, **({"process": {"index_enabled": False}} if args.no_index else {}))
            settings = load_settings(config)
            if not start_lap(config):
                return 1
            token = lap("keys", "create", "--tenant", "bench", "--role", "sensor", config=config).stdout.strip()
            url = settings.api_url
        else:
            try:
                token = args.token or (args.key_file.read_text().strip() if args.key_file else "")
            except OSError as exc:
                parser.error(f"cannot read --key-file: {exc}")
            if not token:
                parser.error("--url needs --token or --key-file (a sensor key)")
            url = args.url.rstrip("/")
            try:
                settings = load_settings(args.config)
            except ConfigError as exc:
                parser.error(str(exc))
        report = measure(args, settings, url, token)
    finally:
        if folder is not None:
            lap("down", config=config)
            shutil.rmtree(folder, ignore_errors=True)
    if report is None:
        return 1
    print_table(report)
    write_report(args.json, report)
    return 0


def measure(args, settings, url: str, token: str) -> dict | None:
    import urllib.request

    probe = urllib.request.Request(f"{url}/caliper", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(probe, timeout=10) as reply:
            reply.read()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable LAP there
        print(f"cannot use {url}/caliper with this token: {exc}", file=sys.stderr)
        return None

    procs, kinesis_pid = local_processes(settings)
    local = bool(procs) and url.startswith(("http://127.0.0.1", "http://localhost"))
    kinesis_proc = psutil.Process(kinesis_pid) if local and kinesis_pid else None
    raw = None
    if local and args.raw_seconds > 0:
        print(f"raw PutRecords ceilings, {args.raw_seconds:.0f} s each...", file=sys.stderr, flush=True)
        raw = asyncio.run(raw_ceilings(settings, args.raw_seconds, args.events_per_envelope, kinesis_proc))

    if args.warmup > 0:
        print(f"warm-up, {args.warmup:.0f} s...", file=sys.stderr, flush=True)
        run_load(args, f"{url}/caliper", token, args.warmup, progress=False)
    print(f"load: {args.rate:,.0f} events/s offered for {args.duration:.0f} s", file=sys.stderr, flush=True)
    cpu_before = cpu_by_kind(procs, kinesis_pid) if local else {}
    machine_before = psutil.cpu_times()
    result = run_load(args, f"{url}/caliper", token, args.duration, progress=True)
    cpu_after = cpu_by_kind(procs, kinesis_pid) if local else {}
    machine_after = psutil.cpu_times()

    per = args.events_per_envelope
    ok = result["statuses"].get(200, 0)
    events = ok * per
    rate = events / result["elapsed"] if result["elapsed"] else 0.0
    lat = result["latencies"]
    cpu = {k: cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0) for k in cpu_after}
    cpu["load generator"] = result["cpu_s"]
    busy = sum(getattr(machine_after, f) - getattr(machine_before, f) for f in ("user", "system", "nice", "irq",
                                                                                 "softirq"))

    def us(seconds: float) -> float | None:
        return round(seconds / events * 1e6, 1) if events else None

    report = {
        "benchmark": "ingest",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"url": url, "rate": args.rate, "duration_s": args.duration, "connections": args.connections,
                   "events_per_envelope": per, "local": local,
                   "index_writer": settings.process.index_enabled if local else None,
                   "throughput_mode": settings.ray.throughput_mode if local else None},
        "offered_events_per_s": args.rate,
        "events_per_s": round(rate),
        "requests_per_s": round(ok / result["elapsed"], 1) if result["elapsed"] else 0,
        "p50_ms": round(pct(lat, 0.50) * 1000, 1),
        "p95_ms": round(pct(lat, 0.95) * 1000, 1),
        "p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "max_ms": round(max(lat) * 1000, 1) if lat else None,
        "statuses": {str(k): v for k, v in result["statuses"].items()},
        "errors": sum(n for s, n in result["statuses"].items() if s != 200),
        "late_envelopes": result["late"],
        "load_generator_cpu_us_per_event": us(result["cpu_s"]),
        "cpu_us_per_event": {k: us(v) for k, v in sorted(cpu.items())} if local else None,
        "ingest_cpu_us_per_event": us(sum(cpu.get(k, 0.0) for k in INGEST_KINDS)) if local else None,
        "kinesis_cpu_us_per_event": us(cpu.get("kinesis stand-in", 0.0)) if local else None,
        "machine_cpu_busy": round(busy / (result["elapsed"] * (os.cpu_count() or 1)), 2),
        "raw": raw,
    }
    if raw:
        report["ratio_to_raw_lap_records"] = round(rate / raw["lap_records"]["events_per_s"], 2)
        report["raw_gain_lap_records_over_one_per_record"] = round(
            raw["lap_records"]["events_per_s"] / raw["one_event_per_record"]["events_per_s"], 1)
    return report


def print_table(r: dict) -> None:
    rows = [
        ("events/s offered / acknowledged", f"{r['offered_events_per_s']:,.0f} / {r['events_per_s']:,}",
         f">= {TARGETS['events_per_s']:,}"),
        ("latency p50 / p95 / p99 / max (ms)", f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} / {r['max_ms']}",
         f"p99 <= {TARGETS['p99_ms']}"),
        ("errors", f"{r['errors']} {r['statuses']}", "0"),
        ("envelopes sent late (no free connection)", f"{r['late_envelopes']}", ""),
        ("CPU µs/event, LAP ingest (proxy + replicas)", f"{r['ingest_cpu_us_per_event']}",
         f"<= {TARGETS['ingest_cpu_us_per_event']}"),
        ("CPU µs/event, Kinesis stand-in", f"{r['kinesis_cpu_us_per_event']}",
         f"<= {TARGETS['kinesis_cpu_us_per_event']}"),
        ("CPU µs/event, the load generator itself", f"{r['load_generator_cpu_us_per_event']}", ""),
        ("machine CPU busy (all cores)", f"{r['machine_cpu_busy']:.0%}", ""),
    ]
    if r["raw"]:
        one, ours = r["raw"]["one_event_per_record"], r["raw"]["lap_records"]
        rows += [
            ("raw ceiling, one event per record (ev/s)", f"{one['events_per_s']:,}",
             f"stand-in {one['kinesis_cpu_us_per_event']} µs/event"),
            ("raw ceiling, LAP records (ev/s)", f"{ours['events_per_s']:,}",
             f"stand-in {ours['kinesis_cpu_us_per_event']} µs/event"),
            ("LAP / raw ceiling with LAP records", f"{r['ratio_to_raw_lap_records']}", ""),
        ]
    print()
    for name, value, target in rows:
        print(f"{name:<44} {value:>30}   {target}")
    if r["cpu_us_per_event"]:
        print("\nCPU µs per event, by process: " + ", ".join(f"{k} {v}" for k, v in r["cpu_us_per_event"].items()))


if __name__ == "__main__":
    sys.exit(main())
