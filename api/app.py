"""The farm's HTTP API (FastAPI): operators under /api/v1, agents under /agent/v1.

Run it with `imgfarm api` (uvicorn). The OpenAPI schema is at /openapi.json
and browsable at /docs. Errors come back as {"error": ..., "hint": ...} with
the status code of the farm's error class (imgfarm/errors.py).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgfarm import __version__
from imgfarm.api import agent_routes, boot_routes, metrics, operator_routes, store_routes, windows_routes
from imgfarm.api.auth import meta_access
from imgfarm.api.error_schema import farm_openapi
from imgfarm.api.limits import BodyLimit
from imgfarm.errors import ImgfarmError
from imgfarm.models.dbapi import explain_db_error
from imgfarm.protocol import ProtocolError


def _problems(exc: RequestValidationError) -> str:
    """Each bad field of a request, named ("percent: must be at most 100, not 150").

    Why not FastAPI's default: it echoes the whole input back (an agent's report
    can be large, and a NaN in it made the error itself fail to serialize).
    """
    out = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ProtocolError):
            out.append(str(cause))
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        out.append(f"{where}: {err.get('msg', '')}" if where else str(err.get("msg", "")))
    return "; ".join(out)[:2000]


def create_app() -> FastAPI:
    # /docs and /openapi.json are served below, behind the same setting as /metrics
    app = FastAPI(title="imgfarm", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Capture, restore and convert disk images on PXE-booted nodes.")
    app.add_middleware(BodyLimit)
    app.openapi = lambda: farm_openapi(app)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(meta_access)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(meta_access)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imgfarm API")

    @app.exception_handler(ImgfarmError)
    async def _farm_error(_req: Request, exc: ImgfarmError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own refusals (a body that is not JSON, an unknown path)
        # in the farm's error shape, which /openapi.json declares for every operation.
        what = "request body: not valid JSON" if "parsing the body" in str(exc.detail) else str(exc.detail)
        return JSONResponse({"error": what, "hint": None}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _problems(exc), "hint": "the fields and their types are in "
                             "/openapi.json"}, status_code=422)

    @app.exception_handler(DBAPIError)
    async def _db_error(req: Request, exc: DBAPIError) -> JSONResponse:
        farm_error = explain_db_error(exc)
        if farm_error is None:
            raise exc
        return await _farm_error(req, farm_error)

    started = time.monotonic()

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str | float]:
        """`uptime`: a worker counts an agent's silence only from when the API was back."""
        return {"status": "ok", "version": __version__, "uptime": round(time.monotonic() - started, 1)}

    app.include_router(operator_routes.router)
    app.include_router(agent_routes.router)
    app.include_router(store_routes.router)
    app.include_router(metrics.router)
    app.include_router(windows_routes.router)
    app.include_router(boot_routes.router)
    return app


app = create_app()
