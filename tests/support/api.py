"""The Output API over HTTP, as a reader of one tenant calls it."""

from __future__ import annotations

import httpx

from tests.support.stack import run_lap


def key(lap_up, tenant: str, role: str) -> str:
    return run_lap("keys", "create", "--tenant", tenant, "--role", role, config=lap_up.config).stdout.strip()


def get(settings, token: str | None, path: str, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{settings.api_url}/v1{path}", params=params, headers=headers, timeout=30)
