"""The S3 archive: the bucket that holds archived events and quarantined input.

This module owns the archive's layout: an object's key (tenant, hour, shard and
the batch's first and last sequence numbers), its form (gzipped JSON lines), and
writing and reading one. The batch writer, the index writer, reconcile, replay
and the Output API go through it.
"""

from __future__ import annotations

import gzip
import hashlib
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson
from botocore.exceptions import ClientError

from lap.settings import Settings
from lap.stream.record_format import line_meta

# What LAP does under each prefix of the bucket (fields of ArchiveSettings), besides listing it (s3:ListBucket
# on the bucket). deploy/iam-policy.json grants exactly this (tests/test_deploy_config.py checks both ways), and
# `lap preflight` asks IAM whether the nodes' role may do it.
OBJECT_ACTIONS: dict[str, tuple[str, ...]] = {
    "prefix": ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"),  # archived batches; the sweep deletes leftovers
    "receipts_prefix": ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"),  # receipts; the sweep, as above
    "dedup_prefix": ("s3:GetObject", "s3:PutObject"),  # closed dedup buckets
    # records kept as read; replay reads them; a tenant's deletion deletes them
    "dead_letter_prefix": ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"),
    "quarantine_prefix": ("s3:PutObject", "s3:DeleteObject"),  # refused input, for people to read; as above
}


GZIP_LEVEL = 3  # ~4x smaller than the JSON at a few ms per MB; the archive is write-mostly


def hour_prefix(settings: Settings, tenant: str, hour: datetime) -> str:
    """Where a tenant's objects of one (UTC) hour are: every key below it names that hour."""
    return f"{settings.archive.prefix}/tenant={quote(tenant, safe='')}/date={hour:%Y-%m-%d}/hour={hour:%H}/"


def archive_key(settings: Settings, tenant: str, hour: datetime, shard_id: str, first: int, last: int,
                replay: str | None = None) -> str:
    """A batch's object of one tenant and hour; a replay that rebuilds it writes beside it (`replay`)."""
    suffix = "" if replay is None else f"-r{replay}"
    return f"{hour_prefix(settings, tenant, hour)}shard={shard_id}/{first}-{last}{suffix}.jsonl.gz"


def learner_hash32(key: str) -> int:
    """A learner's 32-bit hash in an object's `learners` (the partition key: the learner's IRI, or the event's id
    for an event without a learner). Two learners may share one: the object is then read for nothing."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big", signed=True)


def erased_key(key: str, erasure_id: int) -> str:
    """Where an object goes once an erasure has taken events out of it: beside it, named by the erasure."""
    folder, name = key.removesuffix(".jsonl.gz").rsplit("/", 1)
    return f"{folder}/{name.split('-e', 1)[0]}-e{erasure_id}.jsonl.gz"  # one erasure's mark, the latest


def pack_lines(lines: list[bytes]) -> bytes:
    """An object's body: the lines, gzipped the same way every time (mtime 0), so a rewrite is byte-identical."""
    return gzip.compress(b"\n".join(lines) + b"\n", compresslevel=GZIP_LEVEL, mtime=0)


async def put_object(s3: Any, settings: Settings, key: str, body: bytes) -> None:
    await s3.put_object(Bucket=settings.archive.bucket, Key=key, Body=body, ContentType="application/x-ndjson",
                        ContentEncoding="gzip")


async def read_object(s3: Any, settings: Settings, key: str) -> list[dict[str, Any]]:
    """An object's lines, parsed: {"meta": ..., "item": ...} each."""
    return [orjson.loads(line) for line in await read_lines(s3, settings, key)]


async def read_metas(s3: Any, settings: Settings, key: str) -> list[dict[str, Any]]:
    """An object's lines with their `meta` alone, for the index writer: a tenth of the parsing.

    A line is `{"meta": {...}, "item": {...}}`, meta first (LAP writes it so),
    and its meta carries the actor's and the object's IRIs (`actor`,
    `object`). Lines written before it did are parsed whole, their item kept.
    """
    lines = []
    for line in await read_lines(s3, settings, key):
        meta = line_meta(line)
        lines.append({"meta": meta} if meta is not None and "actor" in meta else orjson.loads(line))
    return lines


async def read_lines(s3: Any, settings: Settings, key: str) -> list[bytes]:
    reply = await s3.get_object(Bucket=settings.archive.bucket, Key=key)
    async with reply["Body"] as body:
        data = await body.read()
    return [line for line in gzip.decompress(data).splitlines() if line]


async def ensure_bucket(s3: Any, settings: Settings) -> None:
    bucket = settings.archive.bucket
    try:
        await s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if settings.aws.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.aws.region}
    try:
        await s3.create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


async def keys_in_s3(settings: Settings, s3: Any, keys: set[str]) -> set[str]:
    """Which of these archive keys exist, listing each tenant-and-hour prefix once (not one HEAD per object)."""
    prefixes = {key.rsplit("/shard=", 1)[0] + "/" for key in keys}
    present: set[str] = set()
    paginator = s3.get_paginator("list_objects_v2")
    for prefix in sorted(prefixes):
        async for page in paginator.paginate(Bucket=settings.archive.bucket, Prefix=prefix):
            present.update(o["Key"] for o in page.get("Contents", []))
    return present & keys


async def check_archive(settings: Settings, pool: Any, s3: Any, since: datetime) -> int:
    """Record the manifest's objects from `since` on that S3 no longer has; returns how many are lost now."""
    async with pool.acquire() as conn:
        objects = await conn.fetch(
            "SELECT key, tenant, received_hour, records FROM archive_objects WHERE received_hour >= $1", since)
    present = await keys_in_s3(settings, s3, {o["key"] for o in objects})
    lost = [(o["key"], o["tenant"], o["received_hour"], o["records"]) for o in objects if o["key"] not in present]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM lost_archive_objects WHERE received_hour >= $1", since)
        await conn.executemany(
            """INSERT INTO lost_archive_objects (key, tenant, received_hour, records) VALUES ($1, $2, $3, $4)
               ON CONFLICT (key) DO NOTHING""", lost)
        await conn.execute(
            """INSERT INTO archive_checks (id, checked_at, since_hour) VALUES (true, now(), $1)
               ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at, since_hour = excluded.since_hour""",
            since)
    return len(lost)
