"""The ui's HTTP API (FastAPI) and its page: the app, its guard and its errors; the routes are in ``routers``.

Every request needs the session token (``?token=`` in the printed URL, then a same-site cookie the page gets on
its first load, or an ``X-Clmtune-Token`` header): without it, 401. Paths in requests are workspace-relative and
checked by ``Workspace.resolve`` (403 outside). Work is done by ``clmtune`` child processes (``jobs``), so the page
never trains differently from the command line.
"""

from __future__ import annotations

import secrets
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clmtune.errors import ClmtuneError
from clmtune.ui.common import Ui, UiError
from clmtune.ui.jobs import JobQueue
from clmtune.ui.playground import Playground
from clmtune.ui.routers import data, jobs, page, playground, runs
from clmtune.ui.workspace import PathRefused, Workspace

COOKIE = "clmtune_ui_token"
BODY_LIMIT = 1 << 20  # JSON bodies; uploads have their own limit


def add_guard(app: FastAPI, token: str, upload_limit: int) -> None:
    """The token on every request (401 without it; the cookie set from ``?token=``), and the body limits (413)."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = (request.query_params.get("token") or request.headers.get("x-clmtune-token")
                 or request.cookies.get(COOKIE) or "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "missing or wrong token: open the URL `clmtune ui` printed "
                                          "(it ends with ?token=...)"}, status_code=401)
        length = request.headers.get("content-length")
        limit = upload_limit if request.url.path.startswith("/api/upload") else BODY_LIMIT
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"error": f"the request body is over {limit} bytes"}, status_code=413)
        response = await call_next(request)
        if request.query_params.get("token") and request.cookies.get(COOKIE) != token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response


def add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"error": "one line"}`` with its status."""

    @app.exception_handler(UiError)
    async def _ui(request: Request, exc: UiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(PathRefused)
    async def _refused(request: Request, exc: PathRefused):
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(ClmtuneError)
    async def _user(request: Request, exc: ClmtuneError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        return JSONResponse({"error": f"{where}: {err.get('msg')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def create_app(workspace: str | Path, token: str | None = None, upload_limit: int = 100 << 20,
               python: str = sys.executable, stop_grace_s: float = 60.0) -> FastAPI:
    ws = Workspace(workspace)
    token = token or secrets.token_urlsafe(24)
    ui = Ui(ws=ws, jobs=JobQueue(ws.root, ws.state, python=python, grace_s=stop_grace_s),
            play=Playground(ws.root, ws.state, python=python), upload_limit=upload_limit, python=python)

    @asynccontextmanager
    async def lifespan(app):
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0))
        yield
        await app.state.http.aclose()
        await run_in_threadpool(ui.play.close)
        await run_in_threadpool(ui.jobs.close)

    app = FastAPI(title="clmtune ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = ui
    app.state.token, app.state.jobs, app.state.playground, app.state.workspace = token, ui.jobs, ui.play, ws
    add_guard(app, token, upload_limit)
    add_error_handlers(app)
    for group in (page, data, jobs, runs, playground):
        app.include_router(group.router)
    return app


def serve_ui(workspace: str | Path = ".", host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False,
             upload_limit_mb: int = 100) -> None:
    import uvicorn

    token = secrets.token_urlsafe(24)
    app = create_app(workspace, token, upload_limit=upload_limit_mb << 20)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/?token={token}"
    print(f"clmtune ui: workspace {app.state.workspace.root}\n  open {url}\n  (the token keeps other users and "
          f"web pages out; Ctrl-C stops the server and any training it started)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"clmtune ui: warning: listening on {host}: anyone who can reach this machine and has the token can "
              "train and read the workspace", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
