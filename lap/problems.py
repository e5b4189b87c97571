"""The one shape of every refusal LAP's HTTP APIs give: an RFC 7807 problem (application/problem+json)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from lap.caliper import ItemProblem

PROBLEM_JSON = "application/problem+json"


class HTTPProblem(Exception):
    """A request answered with a 4xx or a 503 and a `detail` a person can act on; `problems` are the
    per-item findings of a Caliper envelope, when there are some."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, *,
                 problems: list[ItemProblem] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.headers = headers or {}
        self.problems = problems or []

    def response(self, max_problems: int = 0, **extra: Any) -> Response:
        """The problem document; with `max_problems`, the first problems as `errors` (and how many were left out)."""
        body = {"type": f"urn:lap:problem:{self.status}", "title": self.title, "status": self.status,
                "detail": self.detail, **extra}
        if self.problems and max_problems:
            body["errors"] = [{"index": p.index, "path": p.path, "message": p.message}
                              for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                body["errors_omitted"] = len(self.problems) - max_problems
        return Response(orjson.dumps(body), status_code=self.status, media_type=PROBLEM_JSON, headers=self.headers)
