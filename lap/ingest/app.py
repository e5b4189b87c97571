"""The IngestAPI Serve deployment: LAP's front door (`POST /caliper`, `GET /caliper`, `/healthz`).

A 200 is sent only after Kinesis has acknowledged every record of the
envelope. Everything refused gets an RFC 7807 problem naming each bad event by
index and JSON path; refused envelopes (400, 413, 422) go to the quarantine.
"""


import asyncio
import gc
import logging
import re
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from lap import __version__, metrics
from lap.audit.receipts import AcknowledgedCounts
from lap.auth import KeyCache, Principal, bearer_token, declare_bearer_auth
from lap.caliper import SUPPORTED_VERSIONS, CaliperError, Envelope, parse_envelope
from lap.health import HEALTH_RESPONSES, CachedHealth, HealthReport, health_reply
from lap.ingest.limits import RateLimiter, retry_after
from lap.ingest.quarantine import Quarantine
from lap.ingest.records import ItemsTooDeep, RecordTooLarge, pack
from lap.problems import PROBLEM_JSON, HTTPProblem
from lap.settings import Settings, load_settings
from lap.web import add_offline_docs
from lap.stream.producer import CoalescedPuts, Producer, PutDeadlineExceeded, StreamRejected
from lap.stores import Stores
from lap.stream.shard_map import ShardMapCache

log = logging.getLogger("lap.ingest")

MAX_PROBLEMS = 100

app = FastAPI(
    title="LAP Ingest API",
    version=__version__,
    description="Receives IMS Caliper envelopes (1.1 and 1.2) and puts every event durably into the stream "
                "before it answers.",
    docs_url=None,  # lap.web.add_offline_docs serves it without a CDN
    redoc_url=None,
)
declare_bearer_auth(app, open_paths={"/healthz"})
add_offline_docs(app)

_ENVELOPE_SCHEMA = {
    "type": "object",
    "required": ["sensor", "sendTime", "dataVersion", "data"],
    "properties": {
        "sensor": {"type": "string", "description": "IRI of the sensor"},
        "sendTime": {"type": "string", "format": "date-time"},
        "dataVersion": {"type": "string", "enum": list(SUPPORTED_VERSIONS)},
        "data": {"type": "array", "minItems": 1, "items": {"type": "object"},
                 "description": "Caliper events and entity describes"},
    },
    "additionalProperties": False,
}
_PROBLEM_SCHEMA = {"content": {PROBLEM_JSON: {"schema": {"type": "object"}}}}


def problem_response(refused: HTTPProblem, request_id: str) -> Response:
    metrics.ingest_refusals().inc(tags={"status": str(refused.status)})
    return refused.response(MAX_PROBLEMS, request_id=request_id)


def unauthorized(detail: str) -> HTTPProblem:
    return HTTPProblem(401, "Unauthorized", detail,
                       headers={"WWW-Authenticate": 'Bearer realm="lap", error="invalid_token"'})


def forbidden(detail: str) -> HTTPProblem:
    """A valid key that may not do this (RFC 6750: 403 insufficient_scope), as on /v1."""
    return HTTPProblem(403, "Forbidden", detail,
                       headers={"WWW-Authenticate": 'Bearer realm="lap", error="insufficient_scope"'})


DRAIN_FACTOR = 8  # a body over the limit is still read (and dropped) up to this many times the limit


def _gunzip(body: bytes, limit: int) -> bytes:
    """Every gzip member of the body (RFC 1952 allows several), refused with 413 past `limit` bytes,
    and with 400 when it is damaged, truncated, or followed by bytes that are not gzip."""
    out = bytearray()
    data = body
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise HTTPProblem(400, "Bad Request", f"the gzip body cannot be decompressed: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise HTTPProblem(413, "Payload Too Large", f"the decompressed body is over the limit of {limit} bytes")
        if not inflater.eof:
            raise HTTPProblem(400, "Bad Request", "the gzip body is truncated")
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if not data.startswith(b"\x1f\x8b"):
            raise HTTPProblem(400, "Bad Request", f"the gzip body is followed by {len(data)} bytes that are not gzip")


@dataclass
class Deps:
    """What a replica opens once and reuses for every request."""

    producer: Producer
    shards: ShardMapCache
    keys: KeyCache
    limiter: RateLimiter
    acknowledged: AcknowledgedCounts
    quarantine: Quarantine
    stores: Stores


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed if gzip, refused with 413 past `limit` bytes either way.

    A body over the limit is read to its end (up to DRAIN_FACTOR times the
    limit) before the 413: a server that answers and closes while the client
    is still writing resets the connection, and the sensor never reads why.
    """
    declared = request.headers.get("content-length")
    too_big = bool(declared and declared.isdigit() and int(declared) > limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
            chunks.clear()
        if too_big:
            if size > limit * DRAIN_FACTOR:
                break  # not worth reading further: the answer comes now, and the connection closes
            continue
        chunks.append(chunk)
    if too_big:
        raise HTTPProblem(413, "Payload Too Large", f"the body is {declared or f'over {limit}'} bytes; "
                          f"the limit is {limit} bytes")
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise HTTPProblem(415, "Unsupported Media Type",
                          f"Content-Encoding {encoding!r} is not supported; send gzip or no encoding")
    return _gunzip(body, limit)


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: Request) -> str:
    """The id Serve gives the request (and returns as `x-request-id`), so that the header and the body name one
    request; a client's own id is kept when it is plain enough to be part of an object key."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise HTTPProblem(415, "Unsupported Media Type",
                      f"Content-Type must be application/json, not {value or 'missing'!r}")


def receipt_list(items, packed, receipts) -> list[dict]:
    """Per event, in the envelope's order: where the stream holds it (record, then position inside it)."""
    out: list[dict | None] = [None] * len(items)
    for members, receipt in zip(packed.members, receipts):
        for position, i in enumerate(members):
            out[i] = {"event_id": items[i].id, "shard_id": receipt.shard_id,
                      "sequence_number": receipt.sequence_number, "position": position}
    return out  # type: ignore[return-value]


def _detail(exc: CaliperError) -> str:
    count = len(exc.problems)
    if exc.status == 422:
        return exc.problems[0].message if exc.problems else exc.title
    return f"{count} problem{'s' if count != 1 else ''} found; the envelope was refused as a whole"


def _sensor_of(body: bytes) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    sensor = doc.get("sensor") if isinstance(doc, dict) else None
    return sensor[:500] if isinstance(sensor, str) else None


# Everything the class uses must be defined above it: Serve pickles the class when it is decorated.
@serve.deployment  # its replicas, autoscaling and limits: serve_config.yaml
@serve.ingress(app)
class IngestAPI:
    def __init__(self) -> None:
        self.settings: Settings = load_settings()
        # A request makes thousands of small objects that live until its answer. With Python's default first
        # threshold (700) they are scanned by a collection or two before they die, and then again in the older
        # generations: measured ~10% of a replica's CPU. Serve already froze the objects of start-up.
        gc.set_threshold(20_000, 50, 100)
        self.health = CachedHealth(self.settings)
        self._deps: Deps | None = None
        self._deps_lock = asyncio.Lock()

    async def deps(self) -> Deps:
        if self._deps is not None:
            return self._deps
        async with self._deps_lock:
            if self._deps is None:
                self._deps = await self._open()
        return self._deps

    async def _open(self) -> Deps:
        s = self.settings
        stores = await Stores(s, pool=True, records=True, s3=True).open()
        pool, kinesis, s3 = stores.pool, stores.records, stores.s3
        acknowledged = AcknowledgedCounts(pool)
        acknowledged.start()
        return Deps(
            producer=Producer(CoalescedPuts(kinesis, s.stream.put_calls_in_flight, s.stream.put_linger_s),
                              s.stream.name, s.limits.put_deadline_s),
            shards=ShardMapCache(lambda: kinesis.list_shards(StreamName=s.stream.name), s.stream.shard_map_ttl_s),
            keys=KeyCache(pool, s.auth.key_cache_ttl_s),
            limiter=RateLimiter(s.limits.requests_per_s),
            acknowledged=acknowledged,
            quarantine=Quarantine(s3, pool, s.archive.bucket, s.archive.quarantine_prefix,
                                  s.limits.quarantine_payload_bytes),
            stores=stores,
        )

    async def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: flush what is buffered."""
        if self._deps is not None:
            try:
                await self._deps.acknowledged.close()
                await self._deps.quarantine.close()
            finally:
                await self._deps.stores.close()

    async def authenticate(self, request: Request, deps: Deps) -> Principal:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise unauthorized("send the sensor's key as `Authorization: Bearer <token>`")
        principal = await deps.keys.principal(token)
        if principal is None:
            raise unauthorized("the bearer token is unknown or revoked")
        if principal.role != "sensor":
            raise forbidden(f"{principal.role} keys cannot send events; use a sensor key")
        wait = deps.limiter.wait_seconds(principal.key_id, principal.rate_per_s)
        if wait > 0:
            raise HTTPProblem(429, "Too Many Requests", "this key is over its request rate; retry after the delay",
                              headers={"Retry-After": retry_after(wait)})
        return principal

    @app.get("/healthz", response_model=HealthReport, responses=HEALTH_RESPONSES,
             summary="Readiness of LAP and each of its dependencies")
    async def healthz(self):
        return await health_reply(self.health)

    @app.get("/caliper", summary="Endpoint configuration (Caliper 1.2, section 6.2)",
             responses={401: _PROBLEM_SCHEMA, 403: _PROBLEM_SCHEMA})
    async def caliper_config(self, request: Request) -> Response:
        request_id = request_id_of(request)
        try:
            await self.authenticate(request, await self.deps())
        except HTTPProblem as refused:
            return problem_response(refused, request_id)
        except Exception as exc:
            log.error("request %s failed: %s", request_id, exc)
            return problem_response(HTTPProblem(503, "Service Unavailable", "LAP is starting or a dependency is down",
                                                headers={"Retry-After": "5"}), request_id)
        return Response(orjson.dumps({
            "caliper_maximum_payload_size": self.settings.limits.max_body_bytes // 1024,
            "caliper_supported_versions": list(SUPPORTED_VERSIONS),
            "caliper_supported_extensions": {"endpoint_name": "LAP", "endpoint_version": __version__},
        }), media_type="application/json")

    @app.post(
        "/caliper",
        summary="Send a Caliper envelope",
        description="200 (empty body) once every event is durably in the stream. With "
                    "`Prefer: return=representation` the body lists a receipt per event.",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _ENVELOPE_SCHEMA}}}},
        responses={s: _PROBLEM_SCHEMA for s in (400, 401, 403, 413, 415, 422, 429, 503)},
    )
    async def send(self, request: Request) -> Response:
        received_at = datetime.now(timezone.utc)
        request_id = request_id_of(request)
        principal: Principal | None = None
        body = b""
        try:
            deps = await self.deps()
        except Exception as exc:
            log.error("cannot open the ingest dependencies: %s", exc)
            return problem_response(HTTPProblem(503, "Service Unavailable", "LAP is starting or a dependency is down",
                                                headers={"Retry-After": "5"}), request_id)
        try:
            principal = await self.authenticate(request, deps)
            check_content_type(request.headers.get("content-type"))
            body = await read_body(request, self.settings.limits.max_body_bytes)
            envelope = self.parse(body, self.settings.caliper.whole_number_decimals_v1p2)
            if principal.sensor and envelope.sensor != principal.sensor:
                raise forbidden(f"this key may send only for the sensor {principal.sensor!r}, "
                                f"not {envelope.sensor!r}")
            try:
                packed = pack(envelope, principal, received_at, request_id, await deps.shards.get(),
                              self.settings.limits.max_record_bytes)
            except RecordTooLarge as exc:
                raise HTTPProblem(413, "Payload Too Large", "an event is over the stream's record size limit",
                                  problems=exc.problems) from None
            except ItemsTooDeep as exc:
                raise HTTPProblem(400, "Bad Request", f"{len(exc.problems)} items nest too deep; the envelope was "
                                  "refused as a whole", problems=exc.problems) from None
            try:
                receipts = await deps.producer.put(packed.records)
            except PutDeadlineExceeded as exc:
                log.warning("request %s: %s", request_id, exc)
                raise HTTPProblem(503, "Service Unavailable", "the stream did not acknowledge every event in time; "
                                  "nothing is lost by retrying the same envelope", headers={"Retry-After": "1"}) from None
            except StreamRejected as exc:
                log.error("request %s: %s", request_id, exc)
                raise HTTPProblem(503, "Service Unavailable", "the stream is not available; retry later",
                                  headers={"Retry-After": "5"}) from None
        except HTTPProblem as refused:
            if refused.status in (400, 413, 422) and principal is not None:
                self.quarantine(deps, principal, request, request_id, received_at, refused, body)
            return problem_response(refused, request_id)
        except Exception:  # a dependency failed (Postgres for the key, say): retriable, never a bare 500
            log.exception("request %s failed", request_id)
            return problem_response(HTTPProblem(503, "Service Unavailable", "LAP could not take this request now; "
                                                "retry later", headers={"Retry-After": "5"}), request_id)

        items = envelope.items
        for members, expected, receipt in zip(packed.members, packed.shard_ids, receipts):
            if receipt.shard_id != expected:  # shards were split or merged since the map was listed
                deps.shards.stale()
            # the audit's per-minute count; each event's receipt is the stream record itself (lap/audit/receipts.py)
            deps.acknowledged.add(principal.tenant, envelope.sensor, receipt.shard_id, received_at, len(members))
        if items:  # Ray's counters refuse an increment of 0
            metrics.ingest_events().inc(len(items))
        if "return=representation" in request.headers.get("prefer", ""):
            return Response(orjson.dumps({"request_id": request_id, "receipts": receipt_list(items, packed, receipts)}),
                            media_type="application/json")
        return Response(status_code=200)

    @staticmethod
    def parse(body: bytes, whole_numbers: bool) -> Envelope:
        try:
            return parse_envelope(body, whole_numbers)
        except CaliperError as exc:
            raise HTTPProblem(exc.status, exc.title, _detail(exc), problems=list(exc.problems)) from None

    def quarantine(self, deps: Deps, principal: Principal, request: Request, request_id: str,
                   received_at: datetime, refused: HTTPProblem, body: bytes) -> None:
        sensor = principal.sensor or _sensor_of(body) or "unknown"
        deps.quarantine.submit(
            tenant=principal.tenant, sensor=sensor, key_id=principal.key_id, request_id=request_id,
            received_at=received_at, status=refused.status, title=refused.title,
            problems=[{"index": p.index, "path": p.path, "message": p.message} for p in refused.problems[:MAX_PROBLEMS]],
            body=body,
            headers={k: request.headers.get(k, "") for k in ("content-type", "content-encoding", "user-agent")},
        )

