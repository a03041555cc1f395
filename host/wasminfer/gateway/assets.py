"""The files of the pages for people (`/docs`, `/ui`), all served by this server: our own pages,
scripts and styles (`gateway/static/`) and Swagger UI's from the package that ships it
(`swagger-ui-bundle-v2`), under `/static/NAME`. Only the files named here are served (that
package's folder also holds a demo page that loads a spec from the internet). Every page and file
goes out with a Content-Security-Policy that lets the browser load scripts, styles, images and
API calls from this server only: nothing of the docs or the console comes from anywhere else."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse
from starlette.types import Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

STATIC = Path(__file__).resolve().parent / "static"

# Inline styles stay allowed: Swagger UI's React components set style attributes. Scripts only
# from files of this server (no inline script, no eval), so text a guest wrote (a log line) that
# the console shows can never run, even if it were put into the page as HTML by mistake.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

_SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-bundle.js.map", "swagger-ui.css.map")
_OWN_FILES = ("docs.js", "console.js", "console.css")
_MEDIA = {".js": "text/javascript", ".css": "text/css", ".map": "application/json", ".html": "text/html"}


def static_files() -> dict[str, Path]:
    """Every file served under `/static/`, by name."""
    swagger = Path(str(swagger_ui_path))
    return {
        **{f"swagger-ui/{name}": swagger / name for name in _SWAGGER_FILES},
        **{name: STATIC / name for name in _OWN_FILES},
    }


class Assets:
    """An ASGI app, mounted at `/static`, serving `files` (name: path) with `GET` and `HEAD`; any
    other name is a 404 and any other method a 405 (the gateway's JSON errors)."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise RuntimeError(f"static files missing from the installation: {', '.join(missing)}")
        self.files = dict(files)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root, path = scope.get("root_path", ""), scope["path"]
        name = path[len(root) :].lstrip("/") if path.startswith(root) else ""
        file = self.files.get(name)
        if file is None:
            raise HTTPException(404)
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(405, headers={"Allow": "GET, HEAD"})
        response = FileResponse(
            file,
            media_type=_MEDIA.get(file.suffix, "application/octet-stream"),
            # revalidated every time (the ETag makes that cheap): an upgrade's files show at once
            headers={"cache-control": "no-cache", **SECURITY_HEADERS},
        )
        await response(scope, receive, send)


@functools.cache
def _page_text(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def page(name: str) -> HTMLResponse:
    """The HTML page `gateway/static/NAME`, with the security headers."""
    return HTMLResponse(_page_text(name), headers={"cache-control": "no-cache", **SECURITY_HEADERS})
