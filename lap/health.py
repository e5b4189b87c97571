"""Health of each dependency, for `GET /healthz` and `lap status`.

A checker keeps its clients open between checks, so a probe costs one small
request per dependency, run concurrently with a short timeout each.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

from pydantic import BaseModel

from lap.settings import Settings
from lap.sinks.index import open_opensearch, rebuild_progress
from lap.sinks.store import create_pool, load_migrations
from lap.stream.kinesis import describe_stream

CHECK_TIMEOUT_S = 3.0


class ComponentHealth(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class HealthReport(BaseModel):
    ok: bool
    components: dict[str, ComponentHealth]


class HealthChecker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._stack = AsyncExitStack()
        self._clients: dict[str, Any] = {}
        self._pool = None
        self._opensearch = None
        self._expected_schema = len(load_migrations())

    async def _client(self, service: str) -> Any:
        if service not in self._clients:
            from lap.aws import open_client

            self._clients[service] = await open_client(self._stack, self.settings, service)
        return self._clients[service]

    async def _postgres(self) -> str:
        if self._pool is None:
            self._pool = await create_pool(self.settings.model_copy(
                update={"db": self.settings.db.model_copy(update={"pool_min": 0, "pool_max": 2})}
            ))
        version = await self._pool.fetchval(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0 "
            "ELSE (SELECT coalesce(max(version), 0) FROM schema_migrations) END"
        )
        if version != self._expected_schema:
            raise RuntimeError(f"schema at version {version}, expected {self._expected_schema}")
        return f"schema v{version}"

    async def _kinesis(self) -> str:
        summary = await describe_stream(await self._client("kinesis"), self.settings)
        if summary["StreamStatus"] not in ("ACTIVE", "UPDATING"):
            raise RuntimeError(f"stream is {summary['StreamStatus']}")
        return f"stream {self.settings.stream.name}: {summary['OpenShardCount']} open shards"

    async def _s3(self) -> str:
        await (await self._client("s3")).head_bucket(Bucket=self.settings.archive.bucket)
        return f"bucket {self.settings.archive.bucket}"

    async def _opensearch_check(self) -> str:
        if self._opensearch is None:
            self._opensearch = open_opensearch(self.settings)
        health = await self._opensearch.cluster.health()
        if health.get("status") == "red":
            raise RuntimeError("cluster status red")
        name = self.settings.index.index_prefix
        if not await self._opensearch.indices.exists_index_template(name=name):
            raise RuntimeError(f"index template {name} missing")
        detail = f"cluster {health.get('status', '?')}"
        if self._pool is not None:  # made by the Postgres check, which runs alongside
            try:
                progress = await rebuild_progress(self._pool, self.settings)
            except Exception:  # Postgres has its own line in the report
                progress = None
            if progress is not None:
                done, total = progress
                detail += (f"; rebuilding from the archive behind new events: {done:,} of {total:,} batches "
                           f"({100 * done / max(total, 1):.0f}%)")
        return detail

    async def check(self) -> HealthReport:
        checks = {
            "postgres": self._postgres,
            "kinesis": self._kinesis,
            "s3": self._s3,
            "opensearch": self._opensearch_check,
        }
        results = await asyncio.gather(*(self._timed(fn) for fn in checks.values()))
        components = dict(zip(checks, results))
        return HealthReport(ok=all(c.ok for c in components.values()), components=components)

    @staticmethod
    async def _timed(fn) -> ComponentHealth:
        start = time.perf_counter()
        try:
            detail = await asyncio.wait_for(fn(), CHECK_TIMEOUT_S)
            ok = True
        except asyncio.TimeoutError:
            ok, detail = False, f"no answer within {CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:  # any failure is a health finding, not a crash
            ok, detail = False, _describe(exc)
        return ComponentHealth(ok=ok, detail=detail, latency_ms=round((time.perf_counter() - start) * 1000, 1))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._opensearch is not None:
            await self._opensearch.close()
        await self._stack.aclose()


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


class CachedHealth:
    """Answers health probes from a result at most `max_age_s` old, so probes stay cheap."""

    def __init__(self, settings: Settings, max_age_s: float = 1.0):
        self.checker = HealthChecker(settings)
        self.max_age_s = max_age_s
        self._report: HealthReport | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def report(self) -> HealthReport:
        async with self._lock:
            if self._report is None or time.monotonic() - self._at > self.max_age_s:
                self._report = await self.checker.check()
                self._at = time.monotonic()
            return self._report


# For the `/healthz` routes of both Serve applications.
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": HealthReport, "description": "a dependency is not ready"}
}


async def health_reply(health: CachedHealth):
    from fastapi.responses import JSONResponse

    report = await health.report()
    return JSONResponse(report.model_dump(), status_code=200 if report.ok else 503)
