"""The console Serve application, at `/console/`: one static page that reads the Output API (`/v1`) with the
key a person signs in with.

The page is plain HTML, CSS and JavaScript in lap/web/console/, drawn with SVG:
nothing to build, nothing loaded from another host. The key stays in the
browser tab (sessionStorage) and goes out only in the Authorization header of
its calls to `/v1`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from ray import serve

CONSOLE = Path(__file__).with_name("console")
FILES = {"": ("index.html", "text/html; charset=utf-8"), "console.js": ("console.js", "text/javascript"),
         "console.css": ("console.css", "text/css")}
# the page may talk to its own origin only; no inline script, no frames
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

app = FastAPI(title="LAP console", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/{name:path}", include_in_schema=False)
async def console_file(name: str):
    if name not in FILES:
        return Response(f"no such file in the console: {name}\n", status_code=404, media_type="text/plain",
                        headers=HEADERS)
    file, media_type = FILES[name]
    return FileResponse(CONSOLE / file, media_type=media_type, headers=HEADERS)


@serve.deployment  # its replicas and limits: serve_config.yaml
@serve.ingress(app)
class Console:
    """Static files only: one small replica serves every visitor."""
