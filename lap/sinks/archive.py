"""The S3 archive: the bucket that holds archived events and quarantined input."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from lap.settings import Settings


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
