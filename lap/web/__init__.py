"""Browser assets LAP serves itself, so that no page it serves loads anything from another host.

`make install` installs them with npm into node_modules/ (package.json) and
copies the files served here to vendor/, which the wheel ships.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

VENDOR = Path(__file__).with_name("vendor")
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}


def add_offline_docs(app) -> None:
    """The OpenAPI page at /docs with Swagger UI from vendor/, instead of FastAPI's, which loads it from a CDN
    (and shows a blank page offline). Create the app with docs_url=None and redoc_url=None."""

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title}: docs",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from Swagger's online validator

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        path = VENDOR / name
        if name not in DOCS_ASSETS:
            raise HTTPException(404)
        if not path.is_file():
            raise HTTPException(404, f"{name} is not installed: run make install")
        return FileResponse(path, media_type=DOCS_ASSETS[name], headers={"Cache-Control": "public, max-age=3600"})
