"""Stream processing: shard consumers, aggregation, indexing."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lap.process")


def run_in_background(pid: int = 0, whole_process: bool = True) -> bool:
    """Make a process background work for the CPU (Linux SCHED_IDLE); False where that cannot be done.

    Processing catches up from the stream; ingest must answer sensors now.
    Where both share a machine (`lap up`), the processing side (shard
    consumers, index writer, the archive and index stand-ins, their Postgres
    backends) runs only when ingest leaves a CPU free, and a waking ingest
    process takes the CPU from it at once: a burst slows processing, not the
    acknowledgements (`process.background_cpu`, docs/decisions.md). Any user may
    lower a priority. Linux keeps the policy per thread: every thread of the
    process is moved, and threads made later inherit it from their maker.
    """
    if not hasattr(os, "sched_setscheduler"):
        return False
    idle = os.sched_param(0)
    try:
        tids = os.listdir(f"/proc/{pid or 'self'}/task") if whole_process else [str(pid)]
        for tid in tids:
            try:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, idle)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except OSError as exc:  # another user's process: the priority is an optimisation, not a promise
        log.info("could not run %s as background CPU work: %s", pid or "this process", exc)
        return False
    return True
