"""A lean Kinesis client for the calls on the data path: PutRecords, GetRecords, and ListShards for the shard map.

botocore spends ~90 µs of CPU per record on PutRecords (it walks its service
model to serialise each record, then again to parse each result), and as much
reading GetRecords. This client signs with botocore's own SigV4 and
credentials, but builds the body and reads the reply with orjson: a few µs per
record. Its errors are botocore's `ClientError`, so callers treat both clients
alike; every other Kinesis call stays on aiobotocore.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, NoCredentialsError

from lap.settings import Settings

_TARGET = "Kinesis_20131202."
_CONTENT_TYPE = "application/x-amz-json-1.1"


def _put_entry(record: dict[str, Any]) -> dict[str, Any]:
    entry = {"Data": base64.b64encode(record["Data"]).decode(), "PartitionKey": record["PartitionKey"]}
    if "ExplicitHashKey" in record:
        entry["ExplicitHashKey"] = record["ExplicitHashKey"]
    return entry


class RecordsClient:
    def __init__(self, settings: Settings, timeout_s: float = 30.0, connections: int = 64):
        self.region = settings.aws.region
        self.url = settings.stream.endpoint_url or f"https://kinesis.{self.region}.amazonaws.com"
        self._static = settings.aws_client_kwargs(settings.stream.endpoint_url)
        self._credentials: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=5)
        self._connections = connections

    async def _frozen_credentials(self) -> Credentials:
        if "aws_access_key_id" in self._static:
            return Credentials(self._static["aws_access_key_id"], self._static["aws_secret_access_key"])
        if self._credentials is None:  # the default chain: env, profile, instance role (refreshed as needed)
            from aiobotocore.session import get_session

            self._credentials = await get_session().get_credentials()
            if self._credentials is None:
                raise NoCredentialsError()
        frozen = await self._credentials.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    async def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        body = orjson.dumps({
            "StreamName": StreamName,
            "Records": [_put_entry(r) for r in Records],
        })
        return await self._call("PutRecords", body)

    async def list_shards(self, StreamName: str) -> list[dict[str, Any]]:  # noqa: N803
        """Every shard of the stream, open and closed, following pagination."""
        shards: list[dict[str, Any]] = []
        request: dict[str, Any] = {"StreamName": StreamName}
        while True:
            reply = await self._call("ListShards", orjson.dumps(request))
            shards.extend(reply.get("Shards", []))
            token = reply.get("NextToken")
            if not token:
                return shards
            request = {"NextToken": token}

    async def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:  # noqa: N803
        """GetRecords; each record's `Data` comes back as bytes, as from botocore."""
        reply = await self._call("GetRecords", orjson.dumps({"ShardIterator": ShardIterator, "Limit": Limit}))
        for record in reply.get("Records", ()):
            record["Data"] = base64.b64decode(record["Data"])
        return reply

    async def _call(self, operation: str, body: bytes) -> dict[str, Any]:
        request = AWSRequest(method="POST", url=self.url, data=body,
                             headers={"Content-Type": _CONTENT_TYPE, "X-Amz-Target": _TARGET + operation})
        SigV4Auth(await self._frozen_credentials(), "kinesis", self.region).add_auth(request)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout,
                                                  connector=aiohttp.TCPConnector(limit=self._connections))
        async with self._session.post(self.url, data=body, headers=dict(request.headers.items())) as reply:
            payload = await reply.read()
            status = reply.status
        try:
            parsed = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            parsed = {}
        if status != 200:
            code = str(parsed.get("__type", f"HTTP{status}")).rsplit("#", 1)[-1]
            message = parsed.get("message") or parsed.get("Message") or payload[:200].decode(errors="replace")
            raise ClientError({"Error": {"Code": code, "Message": message},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
        return parsed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
