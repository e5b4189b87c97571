"""Time buckets of the audit trail, always in UTC: the minute of the counters, the hour of the archive's
keys and of the receipts, and the times the stream records carry."""

from __future__ import annotations

from datetime import datetime, timezone
from functools import lru_cache


def parse_time(text: str) -> datetime:
    """A time a stream record carries (ISO 8601); one without a zone is UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


@lru_cache(maxsize=4096)  # a record's events share one receipt time: computed once per record
def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


@lru_cache(maxsize=4096)
def minute_of(moment: datetime) -> datetime:
    """The audit counters' bucket: reconcile counts whole minutes from them."""
    return moment.astimezone(timezone.utc).replace(second=0, microsecond=0)
