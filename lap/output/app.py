"""The OutputAPI Serve deployment, mounted under `/v1`: insights, search and audit."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from lap import __version__
from lap.health import HEALTH_RESPONSES, CachedHealth, HealthReport, health_reply
from lap.settings import load_settings

app = FastAPI(
    title="LAP Output API",
    version=__version__,
    description="Per-learner and per-course insights, event search, audit and replay.",
)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class OutputAPI:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.health = CachedHealth(self.settings)

    @app.get("/healthz", response_model=HealthReport,
             responses=HEALTH_RESPONSES)
    async def healthz(self):
        return await health_reply(self.health)
