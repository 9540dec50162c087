"""The playground of a finished run: open it (a ``clmtune serve`` child, ``ui.playground``), and pass the serve
stage's page (``/play/``), ``/health`` and ``/v1/...`` on to it with its API key added."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from clmtune.run import RunDir
from clmtune.ui.common import RunBody, UiDep, UiError

router = APIRouter()


@router.post("/api/playground")
async def playground(body: RunBody, ui: UiDep):
    path = ui.run_path(body.run)
    RunDir(path).check_finished("open the playground of")
    return await run_in_threadpool(ui.play.open, ui.ws.rel(path), path)


@router.get("/api/playground")
async def playground_status(ui: UiDep):
    return ui.play.status()


async def forward(request: Request, ui, target: str) -> Response:
    play = ui.play
    if not play.status()["ready"]:
        raise UiError(409, "no playground is open: pick a finished run and press Playground")
    headers = {"Authorization": f"Bearer {play.key}"}
    if "content-type" in request.headers:
        headers["Content-Type"] = request.headers["content-type"]
    body = await request.body()
    client: httpx.AsyncClient = request.app.state.http
    upstream = await client.send(client.build_request(request.method, play.base + target, content=body,
                                                      headers=headers), stream=True)
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    content = await upstream.aread()
    await upstream.aclose()
    return Response(content, status_code=upstream.status_code, media_type=upstream.headers.get("content-type"))


@router.get("/play/", include_in_schema=False)
async def play_page(request: Request, ui: UiDep):
    return await forward(request, ui, "/")


@router.get("/health", include_in_schema=False)
async def play_health(request: Request, ui: UiDep):
    return await forward(request, ui, "/health")


@router.api_route("/v1/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
async def play_api(rest: str, request: Request, ui: UiDep):
    return await forward(request, ui, "/v1/" + rest)
