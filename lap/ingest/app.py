"""The IngestAPI Serve deployment: LAP's front door (`/caliper`, `/healthz`)."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from lap import __version__
from lap.health import HEALTH_RESPONSES, CachedHealth, HealthReport, health_reply
from lap.settings import load_settings

app = FastAPI(
    title="LAP Ingest API",
    version=__version__,
    description="Receives IMS Caliper envelopes and puts every event durably into the stream.",
)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class IngestAPI:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.health = CachedHealth(self.settings)

    @app.get(
        "/healthz",
        response_model=HealthReport,
        responses=HEALTH_RESPONSES,
        summary="Readiness of LAP and each of its dependencies",
    )
    async def healthz(self):
        return await health_reply(self.health)
