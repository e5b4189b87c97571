"""The whole box: every part of LAP on one machine at a fixed offered rate, with the proof at the end.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder,
the default settings: ingest, the shard consumers, the index writer and a real
OpenSearch, as `make run` runs them), and then:

1. baselines, before any load, with nothing else loaded: the Kinesis
   stand-in's raw PutRecords ceiling with LAP's records (a stream of its own),
   and OpenSearch's raw bulk rate for LAP's documents (an index of its own,
   LAP's template, LAP's bulk size, one bulk in flight as the index writer
   sends them);
2. the load: envelopes of 50 generated events (unique ids) due at --rate
   events/s whatever the replies (open loop: a reply's latency counts from when
   its envelope was due), from a separate process;
3. every --sample-every seconds: the replies by status and their latency, the
   consumers' lag, the index lag (how long ago the oldest event not yet in the
   index was received), the committed stage counts, and the CPU time and
   memory of every process of the stack, by kind;
4. after the load, the catch-up: until every accepted event is archived,
   aggregated and indexed (bounded by --catch-up-timeout), then `lap reconcile
   --wait` over the load's window.

Two profiles hold the targets of a 2-core box (README, "Measured"):

    .venv/bin/python benchmarks/box.py sustained   # 5,000 events/s for 10 min, 2 of them warm-up
    .venv/bin/python benchmarks/box.py burst       # 10,000 events/s for 60 s, then 120 s to catch up

Any of --rate, --duration, --warmup and --catch-up-limit changes a profile.
Sustained judges memory too: every kind of LAP process within 10% of its size
at the end of the warm-up, and OpenSearch within the bound its heap sets. It
prints a progress line while it runs, then the tables, and writes the JSON
with every sample (--json). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import queue as queues
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lap, machine, start_lap, write_config, write_report  # noqa: E402
from ingest import Bodies, _cpu, pct, raw_ceilings  # noqa: E402

PROFILES = {
    "sustained": {"rate": 5000.0, "duration": 600.0, "warmup": 120.0, "catch_up_limit": None,
                  "targets": {"errors": 0, "index_lag_at_end_s": 30.0, "lap_memory_growth_pct": 10.0}},
    "burst": {"rate": 10_000.0, "duration": 60.0, "warmup": 0.0, "catch_up_limit": 120.0,
              "targets": {"errors": 0, "p99_ms": 250.0}},
}
TENANT = "box"
MB = 2**20
# Processes whose memory is the data they hold (AWS services in production): judged by their own bound, not by
# growth. OpenSearch's is its heap, the direct memory OpenSearch allows itself (half the heap), and room for the
# JVM's own (code, threads, metaspace).
STAND_INS = ("kinesis", "s3", "opensearch", "postgres")
OPENSEARCH_OVERHEAD_MB = 512
BASELINE_DOCS = 300_000  # at most, for OpenSearch's bulk rate (its --baseline-seconds usually end it first)
KINDS = (  # a needle in the command line, and the kind it makes; the first that matches
    ("org.opensearch.bootstrap.OpenSearch", "opensearch"), ("kinesalite", "kinesis"), ("s3rver", "s3"),
    ("postgres", "postgres"), ("haproxy", "ingest"), ("ServeReplica:ingest", "ingest"), ("ProxyActor", "ingest"),
    ("ShardConsumer", "shard consumers"), ("IndexWriter", "index writer"),
)


def kind_of(proc: psutil.Process, supervisor: int) -> str:
    """Which part of the box a process is: the parts the issue's table asks for; the rest of Ray is "ray"."""
    if proc.pid == supervisor:
        return "ray"  # `lap up`, the supervisor, runs the local Ray's driver
    text = " ".join(proc.cmdline()) or proc.name()
    for needle, kind in KINDS:
        if needle in text:
            return kind
    return "ray"


def stack_processes(supervisor: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return []


def read_processes(supervisor: int) -> dict[int, dict]:
    """Per pid under the supervisor: kind, CPU seconds so far, RSS."""
    found = {}
    for proc in stack_processes(supervisor):
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                found[proc.pid] = {"kind": kind_of(proc, supervisor), "cpu_s": times.user + times.system,
                                   "rss": proc.memory_info().rss}
        except psutil.Error:  # gone meanwhile
            continue
    return found


# --- baselines -----------------------------------------------------------------------------------


def lap_lines(n: int, tenant: str, bodies: Bodies) -> list[dict]:
    """Archive lines ({"meta", "item"}) of n generated events, as a shard consumer writes them."""
    import orjson

    from lap.caliper import parse_envelope

    received = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    lines: list[dict] = []
    while len(lines) < n:
        envelope = parse_envelope(bodies.next())
        for item in envelope.items:
            lines.append({"meta": {"event_id": item.id, "tenant": tenant, "sensor": envelope.sensor,
                                   "kind": item.kind, "type": item.type, "action": item.action,
                                   "learner": item.learner, "course": item.course,
                                   "event_time": item.event_time.isoformat().replace("+00:00", "Z"),
                                   "received_at": received},
                          "item": orjson.loads(orjson.dumps(item.doc))})
    return lines[:n]


async def opensearch_ceiling(settings, seconds: float, opensearch: psutil.Process | None) -> dict:
    """LAP's documents bulk-created into an index of their own (LAP's template applies), one bulk in flight at a
    time as the index writer sends them: documents/s, and OpenSearch's CPU per document."""
    import orjson

    from lap.process.index_writer import document
    from lap.sinks.index import document_id, open_opensearch

    size = settings.process.index_batch_docs
    name = f"{settings.index.index_prefix}-zz-box-baseline-{uuid.uuid4().hex[:6]}"
    lines = lap_lines(size, "baseline", Bodies(50, seed=5))
    bodies = []
    for n in range(BASELINE_DOCS // size):  # made before the clock starts: OpenSearch's cost alone
        body = bytearray()
        for k, line in enumerate(lines):  # the same events again, under new ids
            doc = document({"meta": line["meta"] | {"event_id": f"urn:uuid:{n:08x}-0000-4000-8000-{k:012x}"},
                            "item": line["item"]}, 1)
            body += orjson.dumps({"create": {"_index": name, "_id": document_id(doc["event_id"])}})
            body += b"\n" + orjson.dumps(doc) + b"\n"
        bodies.append(bytes(body))
    search = open_opensearch(settings)
    try:
        cpu_before = _cpu(opensearch)
        started = time.monotonic()
        docs = errors = 0
        for body in bodies:
            reply = await search.bulk(body=body, request_timeout=60)
            errors += sum(1 for item in reply["items"] if item["create"].get("status", 500) >= 300)
            docs += len(reply["items"])
            if time.monotonic() - started >= seconds:
                break
        elapsed = time.monotonic() - started
        cpu = _cpu(opensearch) - cpu_before
        return {"docs": docs, "errors": errors, "seconds": round(elapsed, 1), "docs_per_bulk": size,
                "docs_per_s": round(docs / elapsed), "opensearch_cpu_us_per_doc": round(cpu / docs * 1e6, 1)
                if docs and opensearch else None}
    finally:
        await search.indices.delete(index=name, ignore=[404])
        await search.close()


# --- the load: open loop, with a report every interval -----------------------------------------------


def offer_load(url: str, token: str, rate: float, seconds: float, per: int, connections: int, every: float,
               out: multiprocessing.Queue) -> None:
    """Envelopes due at a fixed rate whatever the replies; every `every` s the replies so far, by status, and the
    interval's latencies; at the end every latency's percentiles and this process's own CPU."""
    import aiohttp

    async def run() -> None:
        bodies = Bodies(per, seed=21)
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        interval_latencies: list[float] = []
        interval = per / rate
        total = int(seconds / interval)
        slots = asyncio.Semaphore(connections)
        in_flight: set[asyncio.Task] = set()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        async def send(session: aiohttp.ClientSession, due: float) -> None:
            async with slots:
                try:
                    async with session.post(url, data=bodies.next(), headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0  # no reply at all
            waited = time.perf_counter() - due
            latencies.append(waited)
            interval_latencies.append(waited)
            statuses[status] = statuses.get(status, 0) + 1

        def report(started: float, sent: int) -> None:
            nonlocal interval_latencies
            lat, interval_latencies = interval_latencies, []
            out.put({"t": round(time.perf_counter() - started, 1), "sent": sent, "statuses": dict(statuses),
                     "p50_ms": round(pct(lat, 0.5) * 1000, 1) if lat else None,
                     "p99_ms": round(pct(lat, 0.99) * 1000, 1) if lat else None})

        cpu_start = time.process_time()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            started = time.perf_counter()
            reported = started
            for i in range(total):
                due = started + i * interval
                pause = due - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                task = asyncio.create_task(send(session, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if time.perf_counter() - reported >= every:
                    reported = time.perf_counter()
                    report(started, i + 1)
            sent_for = time.perf_counter() - started
            unsent = 0
            if in_flight:
                _, late = await asyncio.wait(in_flight, timeout=60)
                for task in late:  # still queued for a connection a minute after the last was due: given up
                    task.cancel()
                unsent = len(late)
                if late:
                    await asyncio.wait(late)
        report(started, total)
        out.put({"final": True, "statuses": statuses, "sent": total - unsent, "unsent": unsent,
                 "sent_for": sent_for, "cpu_s": time.process_time() - cpu_start,
                 "p50_ms": round(pct(latencies, 0.5) * 1000, 1), "p99_ms": round(pct(latencies, 0.99) * 1000, 1),
                 "max_ms": round(max(latencies) * 1000, 1) if latencies else None})

    asyncio.run(run())


# --- the pipeline's own figures ------------------------------------------------------------------------


async def read_pipeline(conn, stream: str) -> dict:
    """The committed stage counts of the box's tenant, the consumers' lag as last flushed, and the index lag."""
    stages = {r["stage"]: int(r["n"]) for r in await conn.fetch(
        "SELECT stage, sum(events) AS n FROM stage_counts WHERE tenant = $1 GROUP BY stage", TENANT)}
    lag = await conn.fetchval("SELECT max(lag_ms) FROM shard_status WHERE stream = $1", stream)
    # the oldest committed batch past its shard's index cursor: its newest event was received this long ago
    waiting = await conn.fetchval(
        """SELECT extract(epoch FROM now() - min(b.max_received_at)) FROM batches b
             LEFT JOIN index_cursors i ON i.stream = b.stream AND i.shard_id = b.shard_id
            WHERE b.stream = $1 AND (i.last_seq IS NULL OR b.last_seq > i.last_seq)""", stream)
    consumer_lag_s = None if lag is None else lag / 1000
    index_lag_s = max(consumer_lag_s or 0.0, float(waiting or 0.0))  # not read yet is not indexed either
    return {"stages": stages, "consumer_lag_s": consumer_lag_s, "index_lag_s": round(index_lag_s, 1)}


class Monitor:
    """One Postgres connection for the whole run, opened again if it drops."""

    def __init__(self, settings):
        self.settings = settings
        self.conn = None
        self.loop = asyncio.new_event_loop()

    def read(self) -> dict | None:
        from lap.sinks.store import connect

        async def once():
            if self.conn is None or self.conn.is_closed():
                self.conn = await connect(self.settings)
            return await asyncio.wait_for(read_pipeline(self.conn, self.settings.stream.name), 10)

        try:
            return self.loop.run_until_complete(once())
        except Exception as exc:  # noqa: BLE001 - a missed reading is recorded as such, the run goes on
            print(f"\n(progress not read: {type(exc).__name__}: {exc})", file=sys.stderr)
            self.conn = None
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.loop.run_until_complete(self.conn.close(timeout=5))
        self.loop.close()


def caught_up(stages: dict[str, int], acknowledged: int) -> tuple[bool, bool]:
    """(processed, indexed): every acknowledged event read, archived and aggregated; and every one indexed."""
    accepted = stages.get("accepted", 0)
    kept = accepted - stages.get("duplicates", 0)
    processed = accepted >= acknowledged and stages.get("archived", 0) >= kept and stages.get("aggregated", 0) >= kept
    indexed = processed and stages.get("indexed", 0) >= stages.get("archived", 0) - stages.get("describes", 0)
    return processed, indexed


# --- the run -----------------------------------------------------------------------------------------


def run(args, settings, supervisor: int, token: str) -> dict:
    """Offer the load and sample it, then the catch-up; everything the report needs."""
    per = args.events_per_envelope
    out: multiprocessing.Queue = multiprocessing.Queue()
    loader = multiprocessing.Process(target=offer_load, daemon=True, args=(
        f"{settings.api_url}/caliper", token, args.rate, args.duration, per, args.connections, 1.0, out))
    samples: list[dict] = []
    load: dict = {"statuses": {}, "sent": 0}
    final = None
    tty = sys.stderr.isatty()
    window_start = datetime.now(timezone.utc)
    monitor = Monitor(settings)
    started = time.monotonic()
    loader.start()
    load_ended = processed_at = indexed_at = None
    next_sample = 0.0
    deadline = started + args.duration + 90 + args.catch_up_timeout
    reading = None
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            t = now - started
            while True:
                try:
                    message = out.get_nowait()
                except queues.Empty:
                    break
                if message.get("final"):
                    final = message
                else:
                    load = message
            if final is not None and load_ended is None:
                load_ended = now
            elif load_ended is None and not loader.is_alive() and final is None:
                print("\nthe load process ended without its result", file=sys.stderr)
                break
            reading = monitor.read() or reading
            phase = "warm-up" if t < args.warmup else "load" if load_ended is None else "catch-up"
            if t >= next_sample:
                samples.append(take_sample(t, phase, supervisor, reading, load))
                next_sample += args.sample_every
            if reading and final:
                acknowledged = final["statuses"].get(200, 0) * per
                processed, indexed = caught_up(reading["stages"], acknowledged)
                if processed and processed_at is None:
                    processed_at = now
                if indexed:
                    indexed_at = now
                    samples.append(take_sample(t, "caught up", supervisor, reading, load))
                    break
                if now - load_ended > args.catch_up_timeout:
                    break
            if tty or samples and samples[-1]["t"] == round(t, 1):
                show_progress(t, phase, args, load, reading, tty)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    finally:
        if tty:
            print(file=sys.stderr)
        monitor.close()
        if loader.is_alive():  # only when the run was cut short: the load process is this run's own child
            loader.terminate()
        loader.join(10)
    since_end = (lambda at: None if at is None or load_ended is None else round(at - load_ended, 1))
    return {"samples": samples, "final": final, "window_start": window_start,
            "load_ended_t": None if load_ended is None else round(load_ended - started, 1),
            "processed_after_s": since_end(processed_at), "indexed_after_s": since_end(indexed_at)}


def take_sample(t: float, phase: str, supervisor: int, reading: dict | None, load: dict) -> dict:
    procs = read_processes(supervisor)
    reading = reading or {"stages": {}, "consumer_lag_s": None, "index_lag_s": None}
    by_kind: dict[str, dict] = {}
    for p in procs.values():
        k = by_kind.setdefault(p["kind"], {"cpu_s": 0.0, "rss": 0, "processes": 0})
        k["cpu_s"] += p["cpu_s"]
        k["rss"] += p["rss"]
        k["processes"] += 1
    machine = psutil.cpu_times()
    return {"t": round(t, 1), "phase": phase, "stages": reading["stages"],
            "machine_busy_s": round(sum(machine) - machine.idle - machine.iowait, 2),
            "consumer_lag_s": reading["consumer_lag_s"], "index_lag_s": reading["index_lag_s"],
            "load": {"sent": load.get("sent", 0), "statuses": load.get("statuses", {}),
                     "p50_ms": load.get("p50_ms"), "p99_ms": load.get("p99_ms")},
            "by_kind": by_kind, "pids": {pid: [p["kind"], round(p["cpu_s"], 2), p["rss"]] for pid, p in procs.items()}}


def show_progress(t: float, phase: str, args, load: dict, reading: dict | None, tty: bool) -> None:
    """One line, redrawn every second on a terminal; into a log, one line a sample."""
    stages = (reading or {}).get("stages", {})
    ok = load.get("statuses", {}).get(200, 0) * args.events_per_envelope
    errors = sum(n for s, n in load.get("statuses", {}).items() if s != 200)
    clock = f"{t:5.0f} / {args.duration:.0f} s" if phase in ("warm-up", "load") else f"+{t - args.duration:4.0f} s"
    line = (f"  {phase:<8} {clock}   acknowledged {ok:,}   aggregated {stages.get('aggregated', 0):,}   "
            f"indexed {stages.get('indexed', 0):,}   consumer lag {_s((reading or {}).get('consumer_lag_s'))}   "
            f"index lag {_s((reading or {}).get('index_lag_s'))}   p99 {load.get('p99_ms')} ms   errors {errors}   ")
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def reconcile(config: Path, start: datetime, end: datetime) -> dict:
    """`lap reconcile --json --wait` over whole minutes around the load, as an operator would ask."""
    reply = lap("reconcile", "--tenant", TENANT, "--start", start.isoformat(), "--end", end.isoformat(), "--json",
                "--wait", "120", config=config, timeout=900)
    try:
        result = json.loads(reply.stdout)
    except ValueError:
        said = (reply.stderr or reply.stdout).strip().splitlines() or ["no output"]
        return {"error": said[-1][:300], "exit_code": reply.returncode}
    return result | {"exit_code": reply.returncode, "start": start.isoformat(), "end": end.isoformat()}


# --- the report --------------------------------------------------------------------------------------


def cpu_per_event(samples: list[dict], first: dict, last: dict, events: int) -> dict[str, float]:
    """CPU µs per acknowledged event by kind between two samples (the CPU of processes that ended between them
    is lost: Postgres backends mostly, which live as long as their connection)."""
    if not events:
        return {}
    kinds = set(first["by_kind"]) | set(last["by_kind"])
    return {k: round((last["by_kind"].get(k, {}).get("cpu_s", 0.0) - first["by_kind"].get(k, {}).get("cpu_s", 0.0))
                     / events * 1e6, 1) for k in sorted(kinds)}


def memory(samples: list[dict], warmup: float, heap_mb: int) -> dict:
    """Peak RSS by kind over the run; with a warm-up, growth from its end to the end of the load, judged for LAP's
    own processes; OpenSearch judged against the bound its heap sets."""
    peak: dict[str, int] = {}
    for s in samples:
        for kind, k in s["by_kind"].items():
            peak[kind] = max(peak.get(kind, 0), k["rss"])
    bound = int(heap_mb * 1.5) + OPENSEARCH_OVERHEAD_MB
    report = {"peak_rss_mb": {k: round(v / MB) for k, v in sorted(peak.items())},
              "opensearch_bound_mb": bound,
              "opensearch_within_bound": peak.get("opensearch", 0) / MB <= bound}
    loaded = [s for s in samples if s["phase"] in ("warm-up", "load")]
    base = next((s for s in loaded if s["t"] >= warmup), None) if warmup else None
    if base is None or base is loaded[-1]:
        return report
    end = loaded[-1]
    growth = {}
    for kind in sorted(set(base["by_kind"]) & set(end["by_kind"])):
        before, after = base["by_kind"][kind]["rss"], end["by_kind"][kind]["rss"]
        growth[kind] = round((after - before) / before * 100, 1) if before else None
    lap_kinds = [k for k in growth if k not in STAND_INS]
    report |= {"baseline_t": base["t"], "end_t": end["t"], "rss_growth_pct": growth,
               "lap_max_growth_pct": max((growth[k] for k in lap_kinds if growth[k] is not None), default=None)}
    return report


def build_report(args, settings, baselines: dict, result: dict, rec: dict) -> dict:
    samples, final = result["samples"], result["final"] or {}
    per = args.events_per_envelope
    ok = final.get("statuses", {}).get(200, 0) * per
    loaded = [s for s in samples if s["phase"] in ("warm-up", "load")]
    measured = [s for s in loaded if s["t"] >= args.warmup] or loaded
    first, at_end = (measured[0], measured[-1]) if measured else ({}, {})
    events_in_window = (at_end.get("load", {}).get("statuses", {}).get(200, 0)
                        - first.get("load", {}).get("statuses", {}).get(200, 0)) * per if measured else 0
    whole = cpu_per_event(samples, samples[0], samples[-1], ok) if samples else {}
    machine_us = None
    if measured and events_in_window:  # every process of the machine: LAP, the load generator, this script
        machine_us = round((at_end["machine_busy_s"] - first["machine_busy_s"]) / events_in_window * 1e6, 1)
    window_s = at_end.get("t", 0) - first.get("t", 0) if measured else 0
    report = {
        "benchmark": "box", "profile": args.profile,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
                   "catch_up_limit_s": args.catch_up_limit, "sample_every_s": args.sample_every,
                   "events_per_envelope": per, "connections": args.connections,
                   "opensearch_heap_mb": settings.local.opensearch_heap_mb,
                   "index_batch_docs": settings.process.index_batch_docs},
        "baselines": baselines,
        "offered_per_s": args.rate,
        "acknowledged_events": ok,
        "acknowledged_per_s": round(ok / final["sent_for"]) if final.get("sent_for") else None,
        "statuses": {str(k): v for k, v in final.get("statuses", {}).items()},
        "errors": sum(n for s, n in final.get("statuses", {}).items() if s != 200) + final.get("unsent", 0),
        "p50_ms": final.get("p50_ms"), "p99_ms": final.get("p99_ms"), "max_ms": final.get("max_ms"),
        "load_generator_cpu_us_per_event": round(final["cpu_s"] / ok * 1e6, 1) if ok and final.get("cpu_s") else None,
        "consumer_lag_max_s": max((s["consumer_lag_s"] for s in loaded if s["consumer_lag_s"] is not None),
                                  default=None),
        "index_lag_max_s": max((s["index_lag_s"] for s in loaded if s["index_lag_s"] is not None), default=None),
        "index_lag_at_load_end_s": loaded[-1]["index_lag_s"] if loaded else None,
        "processed_after_load_s": result["processed_after_s"], "indexed_after_load_s": result["indexed_after_s"],
        "cpu_us_per_event_measured_window": cpu_per_event(samples, first, at_end, events_in_window)
        if measured else {},
        "cpu_us_per_event_whole_run": whole,
        "machine_cpu_us_per_event": machine_us,
        "machine_busy_pct": round((at_end["machine_busy_s"] - first["machine_busy_s"]) / window_s
                                  / (psutil.cpu_count() or 1) * 100) if window_s > 0 else None,
        "memory": memory(samples, args.warmup, settings.local.opensearch_heap_mb),
        "reconcile": rec,
        "samples": samples,
    }
    report["verdict"] = verdict(args, report)
    return report


def verdict(args, r: dict) -> dict[str, bool]:
    rec = r["reconcile"]
    stored = (rec.get("complete") is True and rec.get("archived") == rec.get("aggregated")
              == rec.get("accepted", -1) - rec.get("duplicates", 0) == rec.get("indexed"))
    checks = {"no errors": r["errors"] == 0, "reconcile complete, every stage equal to accepted": stored}
    if args.profile == "burst" or args.catch_up_limit is not None:
        checks[f"p99 <= {PROFILES['burst']['targets']['p99_ms']:.0f} ms"] = \
            r["p99_ms"] is not None and r["p99_ms"] <= PROFILES["burst"]["targets"]["p99_ms"]
        limit = args.catch_up_limit or 0
        checks[f"processed and indexed within {limit:.0f} s after the load"] = \
            r["indexed_after_load_s"] is not None and r["indexed_after_load_s"] <= limit
    if args.profile == "sustained":
        target = PROFILES["sustained"]["targets"]
        checks[f"index lag at the end of the load <= {target['index_lag_at_end_s']:.0f} s"] = \
            r["index_lag_at_load_end_s"] is not None and r["index_lag_at_load_end_s"] <= target["index_lag_at_end_s"]
        growth = r["memory"].get("lap_max_growth_pct")
        checks[f"every kind of LAP process within {target['lap_memory_growth_pct']:.0f}% after the warm-up"] = \
            growth is not None and growth <= target["lap_memory_growth_pct"]
        checks["OpenSearch within the bound of its heap"] = r["memory"]["opensearch_within_bound"]
    return checks


def print_tables(r: dict) -> None:
    b = r["baselines"]
    print(f"\nbaselines (before the load, nothing else loaded)")
    kin = b.get("kinesis", {}).get("lap_records", {})
    print(f"  Kinesis stand-in, PutRecords of LAP's records: {kin.get('events_per_s', 0):,} events/s, "
          f"{kin.get('kinesis_cpu_us_per_event')} µs of its CPU per event")
    osb = b.get("opensearch", {})
    print(f"  OpenSearch, bulk of LAP's documents ({osb.get('docs_per_bulk')} a bulk, one in flight): "
          f"{osb.get('docs_per_s', 0):,} documents/s, {osb.get('opensearch_cpu_us_per_doc')} µs of its CPU per "
          "document")
    print(f"\n{r['profile']}: {r['offered_per_s']:,.0f} events/s offered for {r['config']['duration_s']:.0f} s")
    mem = r["memory"]
    rows = [
        ("acknowledged events/s", f"{r['acknowledged_per_s'] or 0:,} ({r['acknowledged_events']:,} events)"),
        ("errors (by status)", f"{r['errors']} {r['statuses']}"),
        ("latency p50 / p99 / max (ms)", f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']}"),
        ("consumer lag, max (s)", f"{r['consumer_lag_max_s']}"),
        ("index lag, max / at the end of the load (s)", f"{r['index_lag_max_s']} / {r['index_lag_at_load_end_s']}"),
        ("after the load: processed / indexed (s)", f"{r['processed_after_load_s']} / {r['indexed_after_load_s']}"),
    ]
    if "rss_growth_pct" in mem:
        rows.append(("memory growth after the warm-up, LAP's largest", f"{mem['lap_max_growth_pct']}%"))
    rec = r["reconcile"]
    rows.append(("reconcile", "error: " + rec["error"] if "error" in rec else
                 f"accepted {rec.get('accepted', 0):,}, archived {rec.get('archived', 0):,}, aggregated "
                 f"{rec.get('aggregated', 0):,}, indexed {rec.get('indexed', 0):,}, complete {rec.get('complete')}"))
    for name, value in rows:
        print(f"  {name:<48} {value}")
    print(f"\n  {'process kind':<18} {'CPU µs/event':>13} {'peak RSS MB':>12} {'RSS growth':>11}")
    cpu = r["cpu_us_per_event_measured_window"]
    for kind in sorted(set(cpu) | set(mem["peak_rss_mb"]), key=lambda k: -cpu.get(k, 0)):
        growth = mem.get("rss_growth_pct", {}).get(kind)
        print(f"  {kind:<18} {cpu.get(kind, 0):>13,.1f} {mem['peak_rss_mb'].get(kind, 0):>12,} "
              f"{'-' if growth is None else f'{growth:+.1f}%':>11}")
    print(f"  {'all of LAP':<18} {sum(cpu.values()):>13,.1f} {sum(mem['peak_rss_mb'].values()):>12,}")
    print(f"  {'the machine':<18} {r['machine_cpu_us_per_event'] or 0:>13,.1f}   (busy {r['machine_busy_pct']}% "
          "of its cores over the measured window)")
    print(f"  (the load generator: {r['load_generator_cpu_us_per_event']} µs per event, in its own process)")
    print()
    for check, passed in r["verdict"].items():
        print(f"  {'PASS' if passed else 'FAIL'}  {check}")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=sorted(PROFILES), help="the targets to hold")
    parser.add_argument("--rate", type=float, help="events/s offered (open loop)")
    parser.add_argument("--duration", type=float, help="seconds of load, warm-up included")
    parser.add_argument("--warmup", type=float, help="seconds of load before the measured window")
    parser.add_argument("--catch-up-limit", type=float, help="seconds after the load by which every event must be "
                                                             "processed and indexed (burst)")
    parser.add_argument("--catch-up-timeout", type=float, default=600,
                        help="seconds to wait at most after the load for the catch-up")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--baseline-seconds", type=float, default=15, help="seconds of each baseline (0: skip)")
    parser.add_argument("--connections", type=int, default=64, help="requests in flight at most")
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/box-<profile>.json")
    args = parser.parse_args()
    for name, value in PROFILES[args.profile].items():
        if name != "targets" and getattr(args, name) is None:
            setattr(args, name, value)
    args.json = args.json or Path(f"benchmarks/results/box-{args.profile}.json")
    if args.rate <= 0 or args.duration <= 0 or args.sample_every <= 0 or args.warmup < 0 \
            or args.warmup >= args.duration or args.catch_up_timeout < 0 or args.baseline_seconds < 0:
        parser.error("--rate, --duration and --sample-every positive; --warmup shorter than --duration; "
                     "--catch-up-timeout and --baseline-seconds not negative")
    if args.rate * args.duration > 12_000_000 or args.connections < 1 or args.events_per_envelope < 1:
        parser.error("at most 12,000,000 events offered; --connections and --events-per-envelope positive")

    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-box-"))
    config = write_config(folder)  # the default settings: everything on, as `lap up` runs it
    settings = load_settings(config)
    if not start_lap(config):
        shutil.rmtree(folder, ignore_errors=True)
        return 1
    try:
        key = lap("keys", "create", "--tenant", TENANT, "--role", "sensor", config=config)
        if key.returncode != 0:
            print(key.stderr, file=sys.stderr)
            return 1
        state = json.loads((settings.run_dir / "state.json").read_text())
        supervisor = state["pid"]
        baselines = {}
        if args.baseline_seconds:
            pids = {name: psutil.Process(info["pid"]) for name, info in state["stand_ins"].items()}
            print("baselines: the Kinesis stand-in's PutRecords ceiling...", file=sys.stderr, flush=True)
            baselines["kinesis"] = asyncio.run(raw_ceilings(settings, args.baseline_seconds,
                                                            args.events_per_envelope, pids.get("kinesis")))
            print("baselines: OpenSearch's bulk rate...", file=sys.stderr, flush=True)
            baselines["opensearch"] = asyncio.run(opensearch_ceiling(settings, args.baseline_seconds,
                                                                     pids.get("opensearch")))
        print(f"{args.profile}: {args.rate:,.0f} events/s for {args.duration:.0f} s (warm-up {args.warmup:.0f} s), "
              f"a sample every {args.sample_every:.0f} s", file=sys.stderr, flush=True)
        result = run(args, settings, supervisor, token=key.stdout.strip())
        start = result["window_start"].replace(second=0, microsecond=0)
        end = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
        print("reconcile...", file=sys.stderr, flush=True)
        rec = reconcile(config, start, end)
    finally:
        print("stopping LAP...", file=sys.stderr, flush=True)
        down = lap("down", config=config)
        if down.returncode != 0:
            print(down.stdout, down.stderr, file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    report = build_report(args, settings, baselines, result, rec)
    print_tables(report)
    write_report(args.json, report)
    return 0 if all(report["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
