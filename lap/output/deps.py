"""What every Output API route depends on: the replica serving it, the caller's key, the problems it may answer.

Here rather than in app.py, which imports the routes: a route module imports this, never app.py.
"""

from fastapi import Depends, Request
from ray import serve

from lap.auth import Principal
from lap.problems import PROBLEM_JSON


async def replica():
    """The OutputAPI replica serving the request (Serve's object, as a method's `self` would be): the routes are
    plain functions, and its stores, settings and replay jobs are per replica."""
    return serve.get_replica_context().servable_object


async def calling_reader(request: Request) -> Principal:
    """The reader or admin key's principal: every route but /healthz depends on it, and its tenant scopes
    every query. A dependency, so a missing key gets its 401 before any parameter's 400."""
    return await (await replica()).caller(request)


REPLICA = Depends(replica)
READER = Depends(calling_reader)

PROBLEMS = {s: {"content": {PROBLEM_JSON: {"schema": {"type": "object"}}}} for s in (400, 401, 403, 404, 503)}
OR_CSV = PROBLEMS | {200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                           "description": "JSON, or with format=csv a CSV file"}}
