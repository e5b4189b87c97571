"""What the Output API's routes take and give alike: windows and time zones, cursors and pages, CSV files."""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import io
import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from fastapi import Query
from fastapi.responses import Response

from lap.audit.reconcile import WindowError, checked_window
from lap.problems import HTTPProblem

MAX_LIMIT = 1000  # rows per page
MAX_AUDIT_HOURS = 24 * 7
MAX_CSV_ROWS = 100_000  # one response holds them all in memory

TIME_ZONE = Query("UTC", max_length=64, description="IANA time zone in which days and hours are read, e.g. "
                                                    "Europe/Paris (default UTC)")


@functools.cache
def time_zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - {"Factory", "localtime"}  # no place's time


def zone(name: str) -> ZoneInfo:
    try:
        if name not in time_zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise HTTPProblem(400, "Bad Request", f"tz {name!r} is not an IANA time zone name, e.g. UTC or "
                                          "America/New_York") from None


SEARCH = Query(None, min_length=1, max_length=200, description="only IRIs that hold this text (any case)")
NEXT_CURSOR = Query(None, max_length=4000, description="next_cursor of the previous page")


def as_utc(name: str, value: datetime) -> datetime:
    """The same instant in UTC: OpenSearch (Java) refuses offsets beyond +-18:00 that Python accepts."""
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 at +14:00, say: before the first UTC instant Python can hold
        raise HTTPProblem(400, "Bad Request", f"{name} is out of the range of dates LAP can store") from None


def check_window(start: datetime, end: datetime) -> None:
    try:
        checked_window("", start, end)
    except WindowError as exc:
        raise HTTPProblem(400, "Bad Request", str(exc)) from None


def next_midnight(moment: datetime, tz: ZoneInfo | None = None) -> datetime:
    """The first midnight (in `tz`, else UTC) at or after `moment`: per-day figures count a day only if it starts
    inside the window."""
    local = moment.astimezone(tz or UTC)
    midnight = datetime(local.year, local.month, local.day, tzinfo=tz or UTC)
    return midnight if midnight == moment else midnight + timedelta(days=1)  # wall-clock days across DST changes


def csv_response(filename: str, columns: list[str], rows) -> Response:
    """Rows as CSV (RFC 4180), for spreadsheets. A text cell that a spreadsheet would read as a formula (it
    starts with =, +, -, @, a tab or a carriage return) gets a leading apostrophe."""
    def cell(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
            return "'" + value
        return "" if value is None else value

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row[c]) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        values = None
    if not isinstance(values, list) or len(values) != length:
        raise HTTPProblem(400, "Bad Request", "cursor is not one this API handed out; start again without it")
    return values


async def iri_page(pool, query, tenant: str, q: str | None, limit: int, cursor: str | None) -> tuple[list, str | None]:
    """One page of a listing by IRI: `query` (lap.output.queries) takes the tenant, the last IRI of the previous
    page, the search text and the row limit, and returns rows whose first column is the IRI."""
    after = str(decode_cursor(cursor, 1)[0]) if cursor else None
    async with pool.acquire() as conn:
        rows = await query(conn, tenant, after, q, limit + 1)
    page = rows[:limit]
    return page, encode_cursor([page[-1][0]]) if len(rows) > limit else None
