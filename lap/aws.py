"""aiobotocore clients built from the settings, shared by the stream and the archive."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from lap.settings import Settings

_session = None


def _config(service: str, endpoint_url: str | None) -> AioConfig:
    extra: dict[str, Any] = {}
    if service == "s3" and endpoint_url:
        extra["s3"] = {"addressing_style": "path"}  # stand-ins and most S3-compatibles
    return AioConfig(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=64,
        # Our own code builds every request; botocore's re-check of each record costs ~20 µs an event.
        parameter_validation=False,
        **extra,
    )


async def open_client(stack: AsyncExitStack, settings: Settings, service: str) -> Any:
    """An aiobotocore client for "kinesis" or "s3" that lives as long as `stack`."""
    global _session
    if _session is None:
        _session = get_session()
    endpoint = settings.stream.endpoint_url if service == "kinesis" else settings.archive.endpoint_url
    return await stack.enter_async_context(
        _session.create_client(service, config=_config(service, endpoint), **settings.aws_client_kwargs(endpoint))
    )
