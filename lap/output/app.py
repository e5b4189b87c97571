"""The OutputAPI Serve deployment, mounted under `/v1`: insights and event search.

Every route takes a Bearer key with the role `reader` or `admin`, and every
query is scoped to that key's tenant: the tenant is never a parameter. IRIs
are query parameters. Errors are RFC 7807 problems, never a 5xx for bad input.

Here are the app, its error handlers and the replica with its stores. The
routes are in routes/ (one router per resource), their SQL in queries.py,
what they depend on in deps.py, the answers' shapes in models.py, what
routes take alike (windows, time zones, cursors, CSV) in params.py, and the
replay jobs in lap/audit/jobs.py.
"""

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import opensearchpy
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from lap import __version__
from lap.audit.erasure import ErasureJobs
from lap.audit.jobs import REPLAY_WATCH_S, ReplayJobs
from lap.auth import KeyCache, Principal, bearer_token, declare_bearer_auth
from lap.output.deps import PROBLEMS, READER
from lap.output.models import Caller
from lap.output.routes import audit, courses, erasures, events, learners
from lap.problems import HTTPProblem
from lap.health import HEALTH_RESPONSES, CachedHealth, HealthReport, health_reply
from lap.settings import load_settings
from lap.web import add_offline_docs
from lap.sinks.index import index_name
from lap.stores import Stores

log = logging.getLogger("lap.output")

app = FastAPI(
    title="LAP Output API",
    version=__version__,
    description="Per-learner and per-course insights and event search, scoped to the caller's tenant.",
    docs_url=None,  # lap.web.add_offline_docs serves it without a CDN
    redoc_url=None,
)
declare_bearer_auth(app, open_paths={"/healthz"})
add_offline_docs(app)


def problem_response(problem: HTTPProblem) -> Response:
    return problem.response()


@app.exception_handler(HTTPProblem)
async def _on_problem(request: Request, exc: HTTPProblem) -> Response:
    return problem_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _on_routing(request: Request, exc: StarletteHTTPException) -> Response:
    """No route or no such method: the same problem+json as every other refusal."""
    detail = str(exc.detail)
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own, e.g. "Not Found": say more
        detail = {404: "no route matches this path; the routes are listed in /v1/openapi.json",
                  405: f"{request.method} is not allowed on this path"}.get(exc.status_code, detail)
    return problem_response(HTTPProblem(exc.status_code, HTTPStatus(exc.status_code).phrase, detail,
                                        dict(exc.headers or {})))


@app.exception_handler(asyncpg.PostgresConnectionError)
@app.exception_handler(asyncpg.InterfaceError)
@app.exception_handler(ConnectionError)
@app.exception_handler(TimeoutError)
async def _on_store_away(request: Request, exc: Exception) -> Response:
    """A store went away after the key was checked (keys are cached): retriable, so a 503, never a 500."""
    log.warning("%s %s: a store did not answer: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(HTTPProblem(503, "Service Unavailable", "a store LAP reads did not answer; retry later",
                                        {"Retry-After": "5"}))


@app.exception_handler(asyncpg.DataError)
@app.exception_handler(OverflowError)
async def _on_out_of_range(request: Request, exc: Exception) -> Response:
    # a parameter or cursor value Postgres or datetime cannot hold (a tampered cursor, year 9999 minus an offset);
    # the exception's text names query arguments and Python values: logged, not shown
    log.info("parameter out of range: %s", exc)
    return problem_response(HTTPProblem(400, "Bad Request", "a date, number or text in the request is out of the range "
                                                        "LAP can store"))


MAX_QUERY_BYTES = 4096  # far above any real query (cursors are ~100 bytes), below the proxies' own limits
QUERY_TOO_LONG = HTTPProblem(414, "URI Too Long",
                             f"the query string is over {MAX_QUERY_BYTES} bytes; no LAP query needs that much")


@app.middleware("http")
async def _refuse_nul(request: Request, call_next):
    """A NUL character can be in no IRI, id or name, and Postgres refuses it in text: a 400 here, for every route.

    A query string over MAX_QUERY_BYTES gets a 414 here, as problem+json (behind Serve's HAProxy, HAProxy gives
    the same answer itself: lap.runner.haproxy_wrapper).
    """
    if len(request.scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        return problem_response(QUERY_TOO_LONG)
    if "\x00" in request.url.path or any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
        return problem_response(HTTPProblem(400, "Bad Request", "the path or a query parameter holds a NUL character"))
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _on_bad_parameters(request: Request, exc: RequestValidationError) -> Response:
    errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
    return problem_response(HTTPProblem(400, "Bad Request", errors or "invalid parameters"))


app.include_router(learners.router)
app.include_router(erasures.router)
app.include_router(courses.router)
app.include_router(audit.router)
app.include_router(events.router)


# Everything the class uses must be defined above it: Serve pickles the class when it is decorated, and
# @serve.ingress(app) takes the app as it is then, so the routers are included above.
@serve.deployment  # its replicas and limits: serve_config.yaml
@serve.ingress(app)
class OutputAPI:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.health = CachedHealth(self.settings)
        self.stores = Stores(self.settings, pool=True, s3=True, kinesis=True, search=True)
        self.keys: KeyCache | None = None
        self.jobs: ReplayJobs | None = None
        self.erasures: ErasureJobs | None = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None

    async def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: stop the background work and close the stores.
        A replay stopped here is resumed by another replica once its heartbeat is stale."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self.jobs is not None:
            self.jobs.cancel()
        if self.erasures is not None:
            self.erasures.cancel()
        await self.health.checker.close()
        await self.stores.close()

    async def check_health(self) -> None:
        """Serve calls this every few seconds on every replica: it keeps the replay watcher running there."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_replays())

    async def _watch_replays(self) -> None:
        await self._open_when_possible()
        await asyncio.gather(self.jobs.watch(), self.erasures.watch())

    async def _open_when_possible(self) -> None:
        while True:
            try:
                return await self._open()
            except Exception as exc:  # Postgres away: try again soon
                log.warning("stores not open yet: %s", exc)
                await asyncio.sleep(REPLAY_WATCH_S)

    async def _open(self) -> None:
        if self.stores.opened:
            return
        async with self._lock:
            if not self.stores.opened:
                stores = await self.stores.open()
                self.keys = KeyCache(stores.pool, self.settings.auth.key_cache_ttl_s)
                self.jobs = ReplayJobs(self.settings, stores.pool, stores.s3, stores.search, stores.kinesis)
                self.erasures = ErasureJobs(self.settings, stores.pool, stores.s3, stores.search)

    async def caller(self, request: Request) -> Principal:
        """The reader or admin key's principal; its tenant scopes every query."""
        try:
            await self._open()
            token = bearer_token(request.headers.get("authorization"))
            principal = await self.keys.principal(token) if token else None
        except Exception as exc:
            log.error("cannot check the key: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", "LAP cannot check keys now; retry later",
                              {"Retry-After": "5"}) from None
        if principal is None:
            raise HTTPProblem(401, "Unauthorized", "send a reader or admin key as `Authorization: Bearer <token>`",
                              {"WWW-Authenticate": 'Bearer realm="lap", error="invalid_token"'})
        if principal.role not in ("reader", "admin"):
            raise HTTPProblem(403, "Forbidden", f"a {principal.role} key cannot read; use a reader or admin key")
        return principal

    async def search(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        """A search of the tenant's own index; a 503 problem when OpenSearch cannot answer."""
        try:
            return await self.stores.search.search(index=index_name(self.settings, tenant), body=body,
                                             ignore_unavailable=True)
        except opensearchpy.RequestError as exc:  # OpenSearch read the query and refused it: no use retrying
            log.warning("search refused: %s", exc)
            raise HTTPProblem(400, "Bad Request", "the search index refused this query; check its dates and filters") \
                from None
        except Exception as exc:
            log.warning("search failed: %s", exc)
            raise HTTPProblem(503, "Service Unavailable", "the search index is not reachable; retry later",
                              {"Retry-After": "5"}) from None

    @app.get("/healthz", response_model=HealthReport, responses=HEALTH_RESPONSES)
    async def healthz(self):
        return await health_reply(self.health)

    @app.get("/whoami", response_model=Caller, responses=PROBLEMS, summary="The tenant and role of the key sent")
    async def whoami(self, caller: Principal = READER):
        return Caller(tenant=caller.tenant, role=caller.role)
