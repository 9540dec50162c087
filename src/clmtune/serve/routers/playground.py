"""``GET /``: the browser playground (``static/index.html``, no CDN)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground():
    return HTMLResponse(resources.files("clmtune.serve").joinpath("static/index.html").read_text("utf-8"))
