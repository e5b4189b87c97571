"""Replay jobs: a replay asked for over the API (or the command line) is a row in `replays`, run in the
background by one Output API replica, its progress saved every few seconds with a heartbeat. Erasure jobs
(lap/audit/erasure.py) run the same way, on JobTasks and save_progress.

A replica that stops leaves its job `running` with a stale heartbeat; every
replica's watcher takes such jobs over (one wins each row), up to
REPLAY_MAX_RUNS runs, after which the job is marked failed. A replay is
idempotent, so running it again after a stop loses nothing and counts nothing
twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from lap.audit.reconcile import Window
from lap.audit.replay import ReplayBusy, Replayer, ReplayError
from lap.settings import Settings

log = logging.getLogger("lap.audit")

PROGRESS_SAVE_S = 2.0  # how often a running job's progress (and heartbeat) is written for the other replicas
REPLAY_STALE_S = 30.0  # a running replay whose heartbeat is older than this lost its replica
REPLAY_WATCH_S = 10.0  # how often each replica looks for such replays
REPLAY_MAX_RUNS = 3  # a replay whose replica stopped this many times is marked failed, not run again


async def record_job(pool, replay_id: str, window: Window, stages: list[str], source: str) -> None:
    """The job's row, `running` from now on."""
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO replays (id, tenant, window_start, window_end, stages, source, status)
               VALUES ($1, $2, $3, $4, $5, $6, 'running')""",
            replay_id, window.tenant, window.start, window.end, stages, source)


class JobTasks:
    """The jobs (replays, erasures) this process runs in the background, and their progress for the API."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, Any]] = {}  # job id -> progress, for the jobs running here
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, job_id: str, run: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        """Run `run(progress)` as a task; its progress is shown under `job_id` while it runs."""
        progress: dict[str, Any] = {}
        self.live[job_id] = progress
        task = asyncio.get_running_loop().create_task(run(progress))
        self._tasks.add(task)  # asyncio keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """Stop every job here (a replica shutting down): their heartbeat goes stale, another replica resumes them."""
        for task in self._tasks:
            task.cancel()


def progress_recorder(progress: dict[str, Any], report=None) -> Callable[[str, int, int], None]:
    """A job's progress callback: it fills `progress` (saved for the other replicas) and tells `report` too (the
    command line's bars)."""
    def on_progress(step: str, done: int, total: int) -> None:
        progress[step] = {"done": done, "total": total}
        if report is not None:
            report(step, done, total)
    return on_progress


async def save_progress(pool, update_sql: str, key: Any, progress: dict[str, Any], what: str) -> None:
    """Every PROGRESS_SAVE_S, `update_sql` ($1 the job's key, $2 its progress) writes the progress and a heartbeat,
    so that every replica can tell the job runs and how far it is. Runs until cancelled."""
    while True:
        await asyncio.sleep(PROGRESS_SAVE_S)
        try:
            async with pool.acquire() as conn:
                await conn.execute(update_sql, key, orjson.dumps(progress).decode())
        except Exception as exc:  # only the progress is late; the result is saved at the end
            log.warning("%s: progress not saved: %s", what, exc)


class ReplayJobs(JobTasks):
    """The replay jobs this process runs, and the watcher that resumes those whose process stopped."""

    def __init__(self, settings: Settings, pool, s3, search, kinesis):
        super().__init__()
        self.settings, self.pool, self.s3, self.search, self.kinesis = settings, pool, s3, search, kinesis

    def start(self, replay_id: str, window: Window, stages: list[str], source: str, resumed: bool = False) -> None:
        self.spawn(replay_id, lambda progress: self.run(replay_id, window, stages, source, progress, resumed))

    async def watch(self) -> None:
        """Resume the replays whose replica stopped (their heartbeat is stale), so none stays `running` for good."""
        while True:
            try:
                await self.resume_stale()
            except Exception as exc:  # Postgres away: try again at the next round
                log.warning("replay watcher: %s", exc)
            await asyncio.sleep(REPLAY_WATCH_S)

    async def resume_stale(self) -> None:
        async with self.pool.acquire() as conn:
            # one replica wins each stale replay: the row is re-checked under its lock
            rows = await conn.fetch(
                """UPDATE replays SET heartbeat_at = now(), attempts = attempts + 1
                    WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $1)
                    RETURNING id, tenant, window_start, window_end, stages, source, attempts""", REPLAY_STALE_S)
            for r in rows:
                if r["attempts"] > REPLAY_MAX_RUNS:
                    await conn.execute(
                        """UPDATE replays SET status = 'failed', finished_at = now(), error = $2
                            WHERE id = $1 AND status = 'running'""",
                        r["id"], f"the replica running it stopped {REPLAY_MAX_RUNS} times; ask for the replay again")
        for r in rows:
            if r["attempts"] <= REPLAY_MAX_RUNS:
                log.warning("resuming replay %s (run %d): the replica running it stopped", r["id"], r["attempts"])
                self.start(r["id"], Window(r["tenant"], r["window_start"], r["window_end"]), list(r["stages"]),
                           r["source"], resumed=True)

    async def run(self, replay_id: str, window: Window, stages: list[str], source: str,
                  progress: dict[str, Any] | None = None, resumed: bool = False, report=None) -> dict[str, Any]:
        """Run the replay and record how it ended in its row: {"status", "result", "error"}.
        `report(step, done, total)` also sees the progress (the command line's bars)."""
        progress = {} if progress is None else progress
        saver = asyncio.get_running_loop().create_task(save_progress(
            self.pool, """UPDATE replays SET progress = $2::jsonb, heartbeat_at = now()
                           WHERE id = $1 AND status = 'running'""", replay_id, progress, f"replay {replay_id}"))
        status, result, error = "done", None, None
        try:
            replayer = Replayer(self.settings, self.pool, self.s3, self.search, self.kinesis,
                                progress_recorder(progress, report))
            result = await replayer.run(replay_id, window, stages, source)
        except ReplayBusy as exc:
            if resumed:  # its first replica is alive after all (a heartbeat late behind long work): it goes on
                self.live.pop(replay_id, None)
                log.info("replay %s: %s; left to the replica running it", replay_id, exc)
                return {"status": "running", "result": None, "error": None}
            status, error = "failed", str(exc)
        except ReplayError as exc:
            status, error = "failed", str(exc)
        except Exception as exc:  # a store went away: the replay can simply be asked for again
            log.exception("replay %s failed", replay_id)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            saver.cancel()
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    """UPDATE replays SET status = $2, progress = $3::jsonb, result = $4::jsonb, error = $5,
                                          finished_at = now() WHERE id = $1""",
                    replay_id, status, orjson.dumps(progress).decode(),
                    None if result is None else orjson.dumps(result, default=str).decode(), error)
        except Exception:
            log.exception("replay %s finished (%s) but its state could not be saved", replay_id, status)
        finally:
            self.live.pop(replay_id, None)
        return {"status": status, "result": result, "error": error}
