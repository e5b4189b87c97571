"""A fault-injecting HTTP proxy in front of the Kinesis stand-in.

It sits on the network path, as a flaky Kinesis would: for PutRecords it can
withhold chosen records from the stand-in and answer for them with a
throttling error (exactly what Kinesis does on a partial failure), or fail a
whole call. Everything else passes through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
from aiohttp import web


class KinesisFaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        # (call number, record position) -> True when that record must fail. Call numbers start at 1.
        self.fail_record: Callable[[int, int], bool] = lambda call, pos: False
        self.fail_call: Callable[[int], bool] = lambda call: False
        self.put_calls = 0
        self.records_seen = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.post(self.upstream + request.path_qs, data=body, headers=headers) as reply:
            return reply.status, await reply.read(), reply.headers.get("Content-Type", "application/x-amz-json-1.1")

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not request.headers.get("X-Amz-Target", "").endswith(".PutRecords"):
            status, data, ctype = await self._forward(request, body)
            return web.Response(status=status, body=data, content_type=ctype.split(";")[0])
        self.put_calls += 1
        call = self.put_calls
        if self.fail_call(call):
            error = {"__type": "InternalFailure", "message": "injected: the whole call failed"}
            return web.Response(status=500, body=json.dumps(error).encode(), content_type="application/x-amz-json-1.1")
        payload = json.loads(body)
        records = payload["Records"]
        self.records_seen += len(records)
        keep = [pos for pos in range(len(records)) if not self.fail_record(call, pos)]
        kept = set(keep)
        upstream_results: list[dict] = []
        if keep:
            payload["Records"] = [records[pos] for pos in keep]
            status, data, _ = await self._forward(request, json.dumps(payload).encode())
            if status != 200:
                return web.Response(status=status, body=data, content_type="application/x-amz-json-1.1")
            upstream_results = json.loads(data)["Records"]
        results, failed = [], 0
        upstream = iter(upstream_results)
        for pos in range(len(records)):
            if pos in kept:
                results.append(next(upstream))
            else:
                failed += 1
                results.append({"ErrorCode": "ProvisionedThroughputExceededException",
                                "ErrorMessage": "injected: rate exceeded for shard"})
        reply = {"FailedRecordCount": failed, "Records": results}
        return web.Response(body=json.dumps(reply).encode(), content_type="application/x-amz-json-1.1")
