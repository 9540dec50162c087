"""The page and its static files (no CDN: everything is served from the package), and ``/api/info``: what the
page may offer (tasks, methods, models, file types)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from clmtune.config import DEFAULT_LEARNING_RATES, PEFT_METHODS
from clmtune.ui.common import UiDep, UiError
from clmtune.ui.workspace import DATA_SUFFIXES

STATIC = ("index.html", "app.js", "style.css")

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(resources.files("clmtune.ui").joinpath("static/index.html").read_text("utf-8"))


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    if name not in STATIC:
        raise UiError(404, f"no such file: {name}")
    text = resources.files("clmtune.ui").joinpath(f"static/{name}").read_text("utf-8")
    kind = {"js": "text/javascript", "css": "text/css", "html": "text/html"}[name.rsplit(".", 1)[1]]
    return Response(text, media_type=f"{kind}; charset=utf-8")


@router.get("/api/info")
async def info(ui: UiDep):
    from clmtune.models.builtin import BUILTIN_MODELS

    from clmtune.tasks import task_names

    return {"workspace": str(ui.ws.root), "upload_limit": ui.upload_limit, "tasks": list(task_names()),
            "methods": list(PEFT_METHODS), "learning_rates": DEFAULT_LEARNING_RATES,
            "models": ["auto", "builtin:gpt2-zh-small", *[f"builtin:{m}" for m in BUILTIN_MODELS]],
            "suffixes": list(DATA_SUFFIXES)}
