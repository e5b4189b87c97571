"""Erasure of a learner's data (admin keys), and the tombstones that prove it."""

from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Path

from lap.audit.erasure import ErasureBusy, ErasureRefused, request_erasure
from lap.auth import Principal
from lap.output.deps import PROBLEMS, READER, REPLICA
from lap.output.models import Erasure, ErasurePage
from lap.problems import HTTPProblem

if TYPE_CHECKING:
    from lap.output.app import OutputAPI

router = APIRouter()


def erasure_model(row, live: dict | None = None, already: bool = False) -> Erasure:
    return Erasure(id=row["job_id"], learner_hash=row["learner_hash"], status=row["status"],
                   requested_at=row["requested_at"], requested_by=row["requested_by"],
                   finished_at=row["finished_at"], counts=orjson.loads(row["counts"]),
                   progress=live if live is not None else orjson.loads(row["progress"]), error=row["error"],
                   already=already)


@router.delete("/learners/{learner:path}", response_model=Erasure, status_code=202, responses=PROBLEMS,
               summary="Erase a learner: their events from the archive, the index, the aggregates and the receipts "
                       "(admin keys)")
async def erase_learner(api: "OutputAPI" = REPLICA,
                        learner: str = Path(..., min_length=1, max_length=2000,
                                            description="the learner's IRI, percent-encoded"),
                        caller: Principal = READER):
    if caller.role != "admin":
        raise HTTPProblem(403, "Forbidden", "only an admin key can erase a learner")
    try:
        row, created = await request_erasure(api.stores.pool, caller.tenant, learner, caller.key_id)
    except ErasureRefused as exc:
        raise HTTPProblem(404, "Not Found", str(exc)) from None
    except ErasureBusy as exc:
        raise HTTPProblem(503, "Service Unavailable", str(exc), {"Retry-After": "10"}) from None
    if created:
        api.erasures.start(row["id"], row["job_id"])
    return erasure_model(row, api.erasures.live.get(row["job_id"]), already=not created)


@router.get("/erasures", response_model=ErasurePage, responses=PROBLEMS,
            summary="The tenant's erasures: the tombstones, newest first")
async def erasures(api: "OutputAPI" = REPLICA, caller: Principal = READER):
    async with api.stores.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM erasures WHERE tenant = $1 ORDER BY requested_at DESC, id DESC",
                                caller.tenant)
    return ErasurePage(erasures=[erasure_model(r, api.erasures.live.get(r["job_id"])) for r in rows])


@router.get("/erasures/{job_id}", response_model=Erasure, responses=PROBLEMS, summary="One erasure")
async def erasure(job_id: str = Path(..., max_length=100), api: "OutputAPI" = REPLICA, caller: Principal = READER):
    async with api.stores.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM erasures WHERE tenant = $1 AND job_id = $2", caller.tenant, job_id)
    if row is None:
        raise HTTPProblem(404, "Not Found", "no erasure with this id")
    return erasure_model(row, api.erasures.live.get(row["job_id"]))
