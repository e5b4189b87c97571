"""Soak: a long steady load through the whole pipeline, to see that memory stays flat and nothing is lost.

Ten minutes (after a warm-up) at 80% of the rate this machine sustains with
everything running as `lap up` runs it: the ingest replicas, the shard
consumers and the index writer. The pipeline benchmark's `processed_per_s`
is measured with the index writer off (5,871 events/s here), and with the
writer on the index is the limit: offered 1,500 events/s, this 2-core box
indexed about 1,150 a second and fell behind (README, "Soak"). So the default
is 80% of SUSTAINED_WITH_INDEX, that measured figure; pass --rate on another
machine. Every sample records the index backlog, to tell a growth that
follows the backlog from a leak.

It starts its own LAP (`lap up --detach` on free ports in a temporary folder,
the default settings), offers envelopes of 50 generated events at --rate
events/s from a separate process (open loop, unique ids), and every
--sample-every seconds records:

- the RSS (and PSS, which shares shared pages out fairly) of every process of
  the stack, by pid and by kind;
- the consumers' lag (`shard_status`, as the audit actor last wrote it) and
  the index writer's backlog (archived minus indexed);
- events acknowledged to the load, and accepted, archived, aggregated and
  indexed so far (the committed `stage_counts`);
- the load's replies by HTTP status.

Then it waits (bounded) for the drain, the index's included, and runs
`lap reconcile --json` over the load's window (whole minutes). The baseline
is the same run's memory at the end of --warmup: growth is measured from there
to the end of the load, and passes at 10% or less. The verdict is over LAP's
own processes (Ray's included); the stand-ins are shown with theirs, not
judged: in production they are AWS services, the OpenSearch stand-in keeps
every document in memory, and Postgres' shared buffers fill as it runs.

    .venv/bin/python benchmarks/soak.py [--rate 920] [--duration 900] [--warmup 300] [--sample-every 10]

It prints a progress line while it runs, then a table, and writes the JSON
with every sample (--json). Exit status 1 when what was accepted was not all
archived and aggregated within --drain-timeout, or reconcile did not answer
complete.
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
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lap, machine, start_lap, write_config, write_report  # noqa: E402
from ingest import Bodies, pct  # noqa: E402
from pipeline import _kind  # noqa: E402

SUSTAINED_WITH_INDEX = 1150.0  # events/s indexed with everything running, measured on this 2-core box (README)
SHARE_OF_SUSTAINABLE = 0.8
GROWTH_LIMIT_PCT = 10.0
TENANT = "soak"
# Processes whose memory is the data they hold (in production they are AWS services): shown, not judged.
STAND_INS = ("kinesis", "s3", "opensearch", "postgres")
MB = 2**20
TOP_PIDS = 8


def default_rate() -> tuple[float, str]:
    """80% of what this machine sustains with the index writer on (SUSTAINED_WITH_INDEX)."""
    return round(SUSTAINED_WITH_INDEX * SHARE_OF_SUSTAINABLE), (
        f"{SHARE_OF_SUSTAINABLE:.0%} of {SUSTAINED_WITH_INDEX:,.0f} events/s, the rate measured with the index "
        "writer on")


# --- the load: open loop, with a report every interval -------------------------------------------


def offer_load(url: str, token: str, rate: float, seconds: float, per: int, connections: int, every: float,
               out: multiprocessing.Queue) -> None:
    """Envelopes due at a fixed rate whatever the replies; every `every` s the replies so far, by status.

    Unlike ingest.py's load, which reports once at the end, a soak needs its
    errors over time: a failure after eight minutes is the finding.
    """
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

        def report(started: float, sent: int, done: bool) -> None:
            nonlocal interval_latencies
            lat, interval_latencies = interval_latencies, []
            out.put({"t": round(time.perf_counter() - started, 1), "sent": sent, "statuses": dict(statuses),
                     "p50_ms": round(pct(lat, 0.5) * 1000, 1) if lat else None,
                     "p99_ms": round(pct(lat, 0.99) * 1000, 1) if lat else None, "done": done})

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
                    report(started, i + 1, False)
            sent_for = time.perf_counter() - started
            unsent = 0
            if in_flight:
                _, late = await asyncio.wait(in_flight, timeout=60)
                for task in late:  # still queued for a connection a minute after the last was due: given up
                    task.cancel()
                unsent = len(late)
                if late:
                    await asyncio.wait(late)
            elapsed = time.perf_counter() - started
        report(started, total, True)
        out.put({"final": True, "statuses": statuses, "sent": total - unsent, "unsent": unsent,
                 "sent_for": sent_for, "elapsed": elapsed,
                 "p50_ms": round(pct(latencies, 0.5) * 1000, 1), "p99_ms": round(pct(latencies, 0.99) * 1000, 1),
                 "max_ms": round(max(latencies) * 1000, 1) if latencies else None})

    asyncio.run(run())


# --- what the stack holds ----------------------------------------------------------------------------


def kind_of(proc: psutil.Process, supervisor: int) -> str:
    """pipeline.py's kinds, with its catch-all split: a soak has to say which part grows."""
    kind = _kind(proc)
    if not kind.startswith("other"):
        return kind
    if proc.pid == supervisor:
        return "lap supervisor"
    text = " ".join(proc.cmdline()) or proc.name()
    for needle, finer in (("HAProxyManager", "serve controller"), ("haproxy", "haproxy"),
                          ("ServeReplica:output", "output replicas"), ("Coordinator", "processing actors"),
                          ("AuditActor", "processing actors"), ("ServeReplica:processing", "processing actors"),
                          ("ServeController", "serve controller"), ("raylet", "ray core"), ("gcs_server", "ray core"),
                          ("dashboard", "ray core"), ("DashboardAgent", "ray core"), ("runtime_env", "ray core"),
                          ("log_monitor", "ray core"), ("monitor.py", "ray core"), ("ray::IDLE", "ray idle workers")):
        if needle in text:
            return finer
    return "other"


def memory_of_stack(supervisor: int) -> dict[int, dict]:
    """Per pid under the supervisor: kind, RSS and PSS (smaps_rollup: cheap enough every few seconds)."""
    try:
        procs = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    except psutil.Error:
        return {}
    found = {}
    for proc in procs:
        try:
            try:
                info = proc.memory_full_info()
                rss, pss = info.rss, info.pss
            except psutil.AccessDenied:  # smaps of another user's process: RSS only
                rss, pss = proc.memory_info().rss, None
            found[proc.pid] = {"kind": kind_of(proc, supervisor), "rss": rss, "pss": pss}
        except psutil.Error:  # gone meanwhile
            continue
    return found


def by_kind(procs: dict[int, dict], field: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for p in procs.values():
        if p[field] is not None:
            totals[p["kind"]] = totals.get(p["kind"], 0) + p[field]
    return totals


async def read_pipeline(conn) -> dict:
    """The committed stage counts of the soak's tenant, and the consumers' lag as last flushed."""
    stages = {r["stage"]: int(r["n"]) for r in await conn.fetch(
        "SELECT stage, sum(events) AS n FROM stage_counts WHERE tenant = $1 GROUP BY stage", TENANT)}
    lag = await conn.fetchrow("SELECT max(lag_ms) AS lag, max(extract(epoch FROM now() - updated_at)) AS age "
                              "FROM shard_status")
    return {"stages": stages, "lag_ms": lag["lag"], "lag_age_s": round(float(lag["age"]), 1)
            if lag["age"] is not None else None}


class Monitor:
    """One Postgres connection for the whole run, opened again if Postgres restarts under it."""

    def __init__(self, settings):
        self.settings = settings
        self.conn = None
        self.loop = asyncio.new_event_loop()

    def read(self) -> dict | None:
        from lap.sinks.store import connect

        async def once():
            if self.conn is None or self.conn.is_closed():
                self.conn = await connect(self.settings)
            return await asyncio.wait_for(read_pipeline(self.conn), 10)

        try:
            return self.loop.run_until_complete(once())
        except Exception as exc:  # noqa: BLE001 - a missed reading is recorded as such, the run goes on
            print(f"\n(progress not read: {type(exc).__name__}: {exc})", file=sys.stderr)
            if self.conn is not None:
                self.loop.run_until_complete(self.conn.close(timeout=5))
            self.conn = None
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.loop.run_until_complete(self.conn.close(timeout=5))
        self.loop.close()


# --- the run -----------------------------------------------------------------------------------------


def soak(args, settings, supervisor: int, token: str) -> dict:
    """Offer the load, sample until it is drained (or the time is up); everything the report needs."""
    per = args.events_per_envelope
    out: multiprocessing.Queue = multiprocessing.Queue()
    loader = multiprocessing.Process(target=offer_load, daemon=True, args=(
        f"{settings.api_url}/caliper", token, args.rate, args.duration, per, args.connections,
        min(args.sample_every, 1.0), out))
    samples: list[dict] = []
    processes: dict[int, str] = {}  # every pid seen, and its kind when last seen
    load = {"statuses": {}, "sent": 0}
    final = None
    due = sorted({*(k * args.sample_every for k in range(int(args.duration // args.sample_every) + 1)),
                  args.warmup, args.duration})
    tty = sys.stderr.isatty()
    window_start = datetime.now(timezone.utc)
    started = time.monotonic()
    loader.start()
    monitor = Monitor(settings)
    load_ended = drained_at = indexed_at = None
    deadline = started + args.duration + 120 + args.drain_timeout
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
            sampled = False
            if due and t >= due[0]:  # under load: on the schedule, so that the warm-up's end is a sample
                phase = "warm-up" if due[0] < args.warmup else "soak"
                while due and t >= due[0]:
                    due.pop(0)
                sampled = True
            elif not due and load_ended is not None and (samples[-1]["phase"] != "drain"
                                                         or t - samples[-1]["t"] >= args.sample_every):
                phase, sampled = "drain", True
            else:
                phase = "warm-up" if t < args.warmup else "soak" if load_ended is None else "drain"
            if sampled:
                samples.append(take_sample(t, phase, supervisor, reading, load, processes))
            if reading and final:
                stages = reading["stages"]
                acknowledged = final["statuses"].get(200, 0) * per
                accepted = stages.get("accepted", 0)
                kept = accepted - stages.get("duplicates", 0)
                if drained_at is None and accepted >= acknowledged and stages.get("archived", 0) >= kept \
                        and stages.get("aggregated", 0) >= kept:
                    drained_at = now
                if drained_at is not None and stages.get("indexed", 0) >= stages.get("archived", 0) - \
                        stages.get("describes", 0):
                    indexed_at = now
                    break
                if load_ended is not None and now - load_ended > args.drain_timeout:
                    break
            if tty or sampled:
                show_progress(t, phase, args, load, reading, samples, tty)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    finally:
        if tty:
            print(file=sys.stderr)
        monitor.close()
        if loader.is_alive():  # only when the run was cut short: the load process is this run's own child
            loader.terminate()
        loader.join(10)
    samples.append(take_sample(time.monotonic() - started, "end", supervisor, monitor_once(settings), load,
                               processes))
    return {"samples": samples, "processes": processes, "final": final, "window_start": window_start,
            "load_ended": None if load_ended is None else load_ended - started,
            "drain_s": None if drained_at is None or load_ended is None else round(drained_at - load_ended, 1),
            "index_drain_s": None if indexed_at is None or load_ended is None else round(indexed_at - load_ended, 1)}


def monitor_once(settings) -> dict | None:
    monitor = Monitor(settings)
    try:
        return monitor.read()
    finally:
        monitor.close()


def take_sample(t: float, phase: str, supervisor: int, reading: dict | None, load: dict,
                processes: dict[int, str]) -> dict:
    procs = memory_of_stack(supervisor)
    for pid, p in procs.items():
        processes[pid] = p["kind"]  # the latest: a Ray worker starts as ray::IDLE and becomes an actor
    reading = reading or {"stages": {}, "lag_ms": None, "lag_age_s": None}
    stages = reading["stages"]
    return {"t": round(t, 1), "phase": phase, "stages": stages, "lag_ms": reading["lag_ms"],
            "lag_age_s": reading["lag_age_s"],
            "index_backlog": stages.get("archived", 0) - stages.get("describes", 0) - stages.get("indexed", 0),
            "load": {"t": load.get("t"), "sent": load.get("sent", 0), "statuses": load.get("statuses", {}),
                     "p50_ms": load.get("p50_ms"), "p99_ms": load.get("p99_ms")},
            "rss_by_kind": by_kind(procs, "rss"), "pss_by_kind": by_kind(procs, "pss"),
            "rss_by_pid": {pid: p["rss"] for pid, p in procs.items()}}


def show_progress(t: float, phase: str, args, load: dict, reading: dict | None, samples: list[dict],
                  tty: bool) -> None:
    """One line, redrawn every second on a terminal; into a log, one line a sample."""
    stages = (reading or {}).get("stages", {})
    ok = load.get("statuses", {}).get(200, 0) * args.events_per_envelope
    errors = sum(n for s, n in load.get("statuses", {}).items() if s != 200)
    lag = (reading or {}).get("lag_ms")
    rss = sum(samples[-1]["rss_by_kind"].values()) / 2**30 if samples else 0.0
    clock = f"{t:5.0f} / {args.duration:.0f} s" if phase != "drain" else f"+{t - args.duration:4.0f} s after"
    line = (f"  {phase:<7} {clock}   acknowledged {ok:,}   "
            f"aggregated {stages.get('aggregated', 0):,}   indexed {stages.get('indexed', 0):,}   "
            f"lag {'-' if lag is None else f'{lag / 1000:.1f} s'}   RSS {rss:.2f} GB   errors {errors}   ")
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def reconcile(config: Path, start: datetime, end: datetime) -> dict:
    """`lap reconcile --json` over whole minutes around the load: the counters, as an operator would ask."""
    reply = lap("reconcile", "--tenant", TENANT, "--start", start.isoformat(), "--end", end.isoformat(), "--json",
                config=config, timeout=600)
    try:
        result = json.loads(reply.stdout)
    except ValueError:
        said = (reply.stderr or reply.stdout).strip().splitlines() or ["no output"]
        return {"error": said[-1][:300], "exit_code": reply.returncode}
    return result | {"exit_code": reply.returncode, "start": start.isoformat(), "end": end.isoformat()}


# --- the report --------------------------------------------------------------------------------------


def growth(before: int, after: int) -> float | None:
    return round((after - before) / before * 100, 1) if before else None


def memory_report(samples: list[dict], warmup: float, processes: dict[int, str]) -> dict:
    """Per kind, the RSS and PSS at the end of the warm-up and at the end of the load, and the verdict."""
    loaded = [s for s in samples if s["phase"] in ("warm-up", "soak")]
    base = next((s for s in loaded if s["t"] >= warmup), None)
    end = loaded[-1] if loaded else None
    if base is None or end is None or end is base:
        return {"error": "no sample after the warm-up"}
    kinds = {}
    for kind in sorted(set(base["rss_by_kind"]) | set(end["rss_by_kind"])):
        rss0, rss1 = base["rss_by_kind"].get(kind, 0), end["rss_by_kind"].get(kind, 0)
        g = growth(rss0, rss1)
        kinds[kind] = {"rss_warm_mb": round(rss0 / MB), "rss_end_mb": round(rss1 / MB), "rss_growth_pct": g,
                       "pss_growth_pct": growth(base["pss_by_kind"].get(kind, 0), end["pss_by_kind"].get(kind, 0)),
                       "stand_in": kind in STAND_INS,
                       "pass": g is not None and g <= GROWTH_LIMIT_PCT}

    def total(sample: dict, field: str, stand_ins: bool) -> int:
        return sum(v for k, v in sample[field].items() if stand_ins or k not in STAND_INS)

    before_pids, after_pids = set(base["rss_by_pid"]), set(end["rss_by_pid"])
    kind = {int(pid): k for pid, k in processes.items()}
    restarted: dict[str, list[int]] = {}  # LAP's processes that ended or began after the baseline: restarts
    for pids, sign in ((before_pids - after_pids, 0), (after_pids - before_pids, 1)):
        for pid in pids:
            if kind.get(int(pid)) not in STAND_INS:  # Postgres' backends come and go with their connections
                restarted.setdefault(kind.get(int(pid), "?"), [0, 0])[sign] += 1
    biggest = sorted((pid for pid in after_pids & before_pids if kind.get(int(pid)) not in STAND_INS),
                     key=lambda pid: -end["rss_by_pid"][pid])[:TOP_PIDS]
    return {"baseline_t": base["t"], "end_t": end["t"], "by_kind": kinds,
            "biggest_lap_pids": [{"pid": int(pid), "kind": kind.get(int(pid)),
                                  "rss_warm_mb": round(base["rss_by_pid"][pid] / MB),
                                  "rss_end_mb": round(end["rss_by_pid"][pid] / MB),
                                  "rss_growth_pct": growth(base["rss_by_pid"][pid], end["rss_by_pid"][pid])}
                                 for pid in biggest],
            "lap_rss_growth_pct": growth(total(base, "rss_by_kind", False), total(end, "rss_by_kind", False)),
            "lap_pss_growth_pct": growth(total(base, "pss_by_kind", False), total(end, "pss_by_kind", False)),
            "stack_rss_growth_pct": growth(total(base, "rss_by_kind", True), total(end, "rss_by_kind", True)),
            "stack_pss_growth_pct": growth(total(base, "pss_by_kind", True), total(end, "pss_by_kind", True)),
            "stack_rss_warm_gb": round(total(base, "rss_by_kind", True) / 2**30, 2),
            "stack_rss_end_gb": round(total(end, "rss_by_kind", True) / 2**30, 2),
            "pids_gone_after_warmup": sorted(before_pids - after_pids),
            "pids_new_after_warmup": sorted(after_pids - before_pids),
            "lap_processes_gone_new_after_warmup": restarted,
            "pass": all(k["pass"] for k in kinds.values() if not k["stand_in"])}


def build_report(args, rate_source: str, settings, run: dict, rec: dict) -> dict:
    samples, final = run["samples"], run["final"] or {}
    per = args.events_per_envelope
    statuses = {str(k): v for k, v in final.get("statuses", {}).items()}
    ok = final.get("statuses", {}).get(200, 0) * per
    loaded = [s for s in samples if s["phase"] in ("warm-up", "soak")]
    lags = [s["lag_ms"] for s in loaded if s["lag_ms"] is not None]
    last = samples[-1]["stages"] if samples else {}
    return {
        "benchmark": "soak",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"rate": args.rate, "rate_source": rate_source, "duration_s": args.duration,
                   "warmup_s": args.warmup, "sample_every_s": args.sample_every, "events_per_envelope": per,
                   "connections": args.connections, "index_writer": settings.process.index_enabled,
                   "growth_limit_pct": GROWTH_LIMIT_PCT},
        "index_writer_seen": "index writer" in run["processes"].values(),
        "offered_per_s": args.rate,
        "acknowledged_events": ok,
        "acknowledged_per_s": round(ok / final["sent_for"]) if final.get("sent_for") else None,
        "statuses": statuses,
        "errors": sum(n for s, n in final.get("statuses", {}).items() if s != 200),
        "ingest_p50_ms": final.get("p50_ms"), "ingest_p99_ms": final.get("p99_ms"),
        "ingest_max_ms": final.get("max_ms"),
        "lag_p50_ms": pct(lags, 0.5) if lags else None, "lag_max_ms": max(lags) if lags else None,
        "index_backlog_at_load_end": loaded[-1]["index_backlog"] if loaded else None,
        "stages_at_end": last,
        "drain_s": run["drain_s"], "index_drain_s": run["index_drain_s"],
        "memory": memory_report(samples, args.warmup, run["processes"]),
        "reconcile": rec,
        "processes": {str(pid): kind for pid, kind in sorted(run["processes"].items())},
        "samples": samples,
    }


def print_table(r: dict) -> None:
    mem = r["memory"]
    print(f"\nmemory, end of warm-up (t={mem.get('baseline_t')} s, the baseline) to end of load "
          f"(t={mem.get('end_t')} s); limit {GROWTH_LIMIT_PCT:.0f}% growth")
    print(f"{'kind':<24} {'RSS warm MB':>12} {'RSS end MB':>11} {'growth':>8} {'PSS growth':>11}   verdict")
    for kind, k in sorted(mem.get("by_kind", {}).items(), key=lambda kv: -kv[1]["rss_end_mb"]):
        verdict = ("PASS" if k["pass"] else "FAIL") + (" (stand-in, not judged)" if k["stand_in"] else "")
        print(f"{kind:<24} {k['rss_warm_mb']:>12,} {k['rss_end_mb']:>11,} {_pct(k['rss_growth_pct']):>8} "
              f"{_pct(k['pss_growth_pct']):>11}   {verdict}")
    if "error" in mem:
        print(f"  {mem['error']}")
    else:
        print(f"{'LAP processes (verdict)':<24} {'':>12} {'':>11} {_pct(mem['lap_rss_growth_pct']):>8} "
              f"{_pct(mem['lap_pss_growth_pct']):>11}   {'PASS' if mem['pass'] else 'FAIL'}")
        print(f"{'whole stack':<24} {mem['stack_rss_warm_gb'] * 1024:>12,.0f} {mem['stack_rss_end_gb'] * 1024:>11,.0f} "
              f"{_pct(mem['stack_rss_growth_pct']):>8} {_pct(mem['stack_pss_growth_pct']):>11}")
    if mem.get("biggest_lap_pids"):
        print(f"\nthe {len(mem['biggest_lap_pids'])} biggest of LAP's processes, one by one")
        for p in mem["biggest_lap_pids"]:
            print(f"  pid {p['pid']:<8} {p['kind']:<20} {p['rss_warm_mb']:>6,} MB -> {p['rss_end_mb']:>6,} MB  "
                  f"{_pct(p['rss_growth_pct'])}")
    rec = r["reconcile"]
    recon = (f"accepted {rec.get('accepted', 0):,} / dup {rec.get('duplicates', 0):,} / archived "
             f"{rec.get('archived', 0):,} / aggregated {rec.get('aggregated', 0):,} / indexed "
             f"{rec.get('indexed', 0):,}") if "error" not in rec else rec["error"]
    rows = [
        ("events/s offered / acknowledged", f"{r['offered_per_s']:,.0f} / {r['acknowledged_per_s'] or 0:,}"),
        ("events acknowledged", f"{r['acknowledged_events']:,}"),
        ("errors (by status)", f"{r['errors']} {r['statuses']}"),
        ("ingest latency p50 / p99 / max (ms)", f"{r['ingest_p50_ms']} / {r['ingest_p99_ms']} / {r['ingest_max_ms']}"),
        ("consumer lag p50 / max (ms)", f"{r['lag_p50_ms']} / {r['lag_max_ms']}"),
        ("index backlog at end of load (events)", f"{r['index_backlog_at_load_end']}"),
        ("drain after the load: processed / indexed (s)", f"{r['drain_s']} / {r['index_drain_s']}"),
        ("LAP processes gone / new after warm-up", ", ".join(
            f"{k} {gone}/{new}" for k, (gone, new) in sorted(mem.get("lap_processes_gone_new_after_warmup",
                                                                     {}).items())) or "none"),
        ("reconcile", recon),
        ("  missing / pending / index pending", f"{rec.get('missing')} / {rec.get('pending')} / "
                                                f"{rec.get('index_pending')}"),
        ("  complete", f"{rec.get('complete')}"),
    ]
    print()
    for name, value in rows:
        print(f"{name:<48} {value}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=None,
                        help=f"events/s offered (default: 80%% of {SUSTAINED_WITH_INDEX:,.0f}, what this kind of "
                             "machine sustains with the index writer on)")
    parser.add_argument("--duration", type=float, default=900, help="seconds of load, warm-up included")
    parser.add_argument("--warmup", type=float, default=300, help="seconds before the memory baseline")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--drain-timeout", type=float, default=600,
                        help="seconds to wait at most after the load for the drain (the index's included)")
    parser.add_argument("--connections", type=int, default=32, help="requests in flight at most")
    parser.add_argument("--events-per-envelope", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args()
    rate_source = "--rate"
    if args.rate is None:
        args.rate, rate_source = default_rate()
    if args.rate <= 0 or args.duration <= 0 or args.sample_every <= 0 or args.warmup < 0 or args.drain_timeout < 0:
        parser.error("--rate, --duration and --sample-every must be positive, --warmup and --drain-timeout not "
                     "negative")
    if args.warmup + args.sample_every > args.duration:
        parser.error("--duration must leave at least one --sample-every after --warmup")
    if args.duration / args.sample_every > 10_000:
        parser.error("over 10,000 samples: raise --sample-every")
    if args.rate * args.duration > 6_000_000 or args.connections < 1 or args.events_per_envelope < 1:
        parser.error("at most 6,000,000 events offered; --connections and --events-per-envelope positive")

    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="lap-bench-soak-"))
    config = write_config(folder)  # the default settings: the index writer on, as `lap up` runs it
    settings = load_settings(config)
    if not settings.api_url.startswith("http://127.0.0.1"):
        parser.error(f"the soak's LAP must answer on 127.0.0.1, not {settings.api_url}")
    if not start_lap(config):
        shutil.rmtree(folder, ignore_errors=True)
        return 1
    try:
        key = lap("keys", "create", "--tenant", TENANT, "--role", "sensor", config=config)
        if key.returncode != 0:
            print(key.stderr, file=sys.stderr)
            return 1
        token = key.stdout.strip()
        supervisor = json.loads((settings.run_dir / "state.json").read_text())["pid"]
        print(f"soak: {args.rate:,.0f} events/s ({rate_source}) for {args.duration:.0f} s, baseline at "
              f"{args.warmup:.0f} s, a sample every {args.sample_every:.0f} s", file=sys.stderr, flush=True)
        run = soak(args, settings, supervisor, token)
        start = run["window_start"].replace(second=0, microsecond=0)
        end = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
        print("reconcile...", file=sys.stderr, flush=True)
        rec = reconcile(config, start, end)
    finally:
        print("stopping LAP...", file=sys.stderr, flush=True)
        down = lap("down", config=config)
        if down.returncode != 0:
            print(down.stdout, down.stderr, file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    report = build_report(args, rate_source, settings, run, rec)
    print_table(report)
    write_report(args.json, report)
    return 0 if run["drain_s"] is not None and rec.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
