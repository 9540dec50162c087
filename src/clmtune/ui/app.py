"""The ui's HTTP API (FastAPI) and its page.

Every request needs the session token (``?token=`` in the printed URL, then a same-site cookie the page gets on
its first load, or an ``X-Clmtune-Token`` header): without it, 401. Paths in requests are workspace-relative and
checked by ``Workspace.resolve`` (403 outside). Work is done by ``clmtune`` child processes (``jobs``), so the page
never trains differently from the command line.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

import httpx
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clmtune.config import DEFAULT_LEARNING_RATES, PEFT_METHODS, from_dict
from clmtune.config.io import structure_problems
from clmtune.errors import ClmtuneError
from clmtune.run import RunDir
from clmtune.ui.jobs import ACTIVE, JobQueue, last_line
from clmtune.ui.playground import Playground
from clmtune.ui.workspace import (CONFIGS, DATA_SUFFIXES, EXPORTS, RUNS, STATE, UPLOADS, PathRefused, Workspace,
                                  check_name)

COOKIE = "clmtune_ui_token"
STATIC = ("index.html", "app.js", "style.css")
PROGRESS_RE = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


class UiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- request bodies ------------------------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Settings(Strict):
    """The form: the keys a newcomer sets; everything else keeps clmtune's defaults (edit the YAML for more)."""
    name: str = Field(description="run name: the run folder is runs/<name>")
    source: str = Field(description="data file (workspace-relative) or builtin:...")
    task: str = Field("classify", description="a registered task (clmtune.tasks); checked by clmtune's validation")
    template: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    response_template: str | None = None
    labels: list[str] | None = None
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    max_length: int | Literal["auto"] | None = "auto"
    model: str = "auto"
    method: str = Field("lora", description="a peft method (config.PEFT_METHODS); checked by clmtune's validation")
    r: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | Literal["auto"] | None = "auto"
    save_steps: int | None = Field(None, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    log_every: int | None = Field(None, ge=1)
    seed: int | None = None


class YamlBody(Strict):
    yaml: str = Field(max_length=200_000)
    name: str | None = None
    overwrite: bool = False


class RunBody(Strict):
    run: str


class EvalBody(Strict):
    run: str
    split: Literal["eval", "test"] = "eval"
    data: str | None = None


class ExportBody(Strict):
    run: str
    merge: bool = False


class CompareBody(Strict):
    runs: list[str] = Field(min_length=1, max_length=8)


# -- helpers -------------------------------------------------------------------------------------------------------
def settings_to_dict(s: Settings) -> dict:
    data = {"source": s.source, "task": s.task}
    for key in ("template", "text_column", "label_column", "response_template", "labels", "eval_fraction",
                "max_train_rows", "max_eval_rows"):
        value = getattr(s, key)
        if value not in (None, "", []):
            data[key] = value
    if s.max_length not in (None, "auto"):
        data["max_length"] = s.max_length
    peft = {"method": s.method}
    if s.r is not None and s.method == "lora":
        peft["r"] = s.r
    train = {"output_dir": f"{RUNS}/{s.name}"}
    for key in ("epochs", "max_steps", "batch_size", "save_steps", "eval_steps", "log_every", "seed"):
        if getattr(s, key) is not None:
            train[key] = getattr(s, key)
    if s.learning_rate not in (None, "auto"):
        train["learning_rate"] = s.learning_rate
    return {"data": data, "model": {"name_or_path": s.model or "auto"}, "peft": peft, "train": train}


def dump_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UiError(400, f"the YAML does not parse: {exc}".replace("\n", " "))
    if not isinstance(raw, dict):
        raise UiError(400, "; ".join(structure_problems(raw, "the YAML")))
    return raw


def validate(ws: Workspace, raw: dict) -> None:
    """clmtune's own validation (one line per problem), then: every path the config names stays in the workspace."""
    from_dict(raw).validate()
    data, train = raw.get("data") or {}, raw.get("train") or {}
    for key in ("source", "eval_file", "test_file", "prepared"):
        if data.get(key):
            ws.check_inside(str(data[key]), f"data.{key}")
    if train.get("output_dir"):
        ws.check_inside(str(train["output_dir"]), "train.output_dir")
    if train.get("deepspeed"):
        ws.check_inside(str(train["deepspeed"]), "train.deepspeed")
    model = str((raw.get("model") or {}).get("name_or_path", "auto"))
    if model != "auto" and not model.startswith("builtin:"):
        ws.check_inside(model, "model.name_or_path")


def find_runs(ws: Workspace, max_depth: int = 3) -> list[Path]:
    """Folders holding a config.yaml and a training log or summary (what `clmtune train` writes)."""
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            if not c.resolve().is_relative_to(ws.root):
                continue
            rd = RunDir(c)
            if rd.config_file.is_file() and (rd.log_file.is_file() or rd.summary_file.is_file()
                                             or rd.checkpoints.is_dir() or rd.running()):
                found.append(c)
            elif depth < max_depth and c.name not in (EXPORTS,):
                walk(c, depth + 1)

    walk(ws.root, 1)
    return found


def progress_of(log_path: Path) -> dict | None:
    """The step counter of `clmtune train`'s progress bar, from the end of the job's output."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 8192))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    hits = PROGRESS_RE.findall(tail)
    return {"step": int(hits[-1][0]), "total": int(hits[-1][1])} if hits else None


def create_app(workspace: str | Path, token: str | None = None, upload_limit: int = 100 << 20,
               python: str = sys.executable, stop_grace_s: float = 60.0) -> FastAPI:
    ws = Workspace(workspace)
    token = token or secrets.token_urlsafe(24)
    jobs = JobQueue(ws.root, ws.state, python=python, grace_s=stop_grace_s)
    play = Playground(ws.root, ws.state, python=python)
    body_limit = 1 << 20  # JSON bodies; uploads have their own limit

    @asynccontextmanager
    async def lifespan(app):
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0))
        yield
        await app.state.http.aclose()
        await run_in_threadpool(play.close)
        await run_in_threadpool(jobs.close)

    app = FastAPI(title="clmtune ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token, app.state.jobs, app.state.playground, app.state.workspace = token, jobs, play, ws

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = (request.query_params.get("token") or request.headers.get("x-clmtune-token")
                 or request.cookies.get(COOKIE) or "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "missing or wrong token: open the URL `clmtune ui` printed "
                                          "(it ends with ?token=...)"}, status_code=401)
        length = request.headers.get("content-length")
        limit = upload_limit if request.url.path.startswith("/api/upload") else body_limit
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"error": f"the request body is over {limit} bytes"}, status_code=413)
        response = await call_next(request)
        if request.query_params.get("token") and request.cookies.get(COOKIE) != token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

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

    def run_path(rel: str) -> Path:
        path = ws.resolve(rel)
        if not RunDir(path).config_file.is_file():
            raise UiError(404, f"{rel} is not a run folder (no config.yaml)")
        return path

    def finished_run(rel: str) -> tuple[Path, str]:
        """A run folder whose training has finished (evaluate, export): its path and workspace-relative name."""
        path = run_path(rel)
        if not RunDir(path).is_finished():
            raise UiError(409, f"{ws.rel(path)} has not finished training")
        return path, ws.rel(path)

    def run_info(path: Path) -> dict:
        rel, rd = ws.rel(path), RunDir(path)
        info = {"run": rel, "name": path.name, "status": "interrupted", "error": None, "job": None,
                "checkpoints": rd.has_checkpoints(), "modified": rd.config_file.stat().st_mtime}
        active = jobs.active_for(rel)
        last = jobs.last_for(rel)
        if active is not None and active.kind in ("train", "resume"):
            info["status"] = "queued" if active.status == "queued" else "running"
            info["job"] = active.id
            info["queue_position"] = jobs.position(active)
            info["progress"] = progress_of(jobs.log_path(active.id))
        elif rd.running():
            info["status"] = "running"
        elif rd.is_finished():
            info["status"] = "finished"
        elif last is not None and last.status == "failed":
            info["status"], info["error"] = "failed", last.error
        elif last is None and not rd.has_checkpoints() and not rd.log_file.is_file():
            info["status"] = "failed"
        if last is not None and info["job"] is None:
            info["job"] = last.id
        if rd.summary_file.is_file():
            try:
                s = rd.load_summary()
                info.update(steps=s.get("steps"), final_loss=s.get("final_loss"), method=s.get("method"),
                            model=s.get("model"), seconds=s.get("seconds"))
            except (ClmtuneError, ValueError):
                pass
        ev = rd.path / "eval.json"
        if ev.is_file():
            try:
                m = json.loads(ev.read_text(encoding="utf-8"))
                info["eval"] = {k: m[k] for k in ("method", "accuracy", "macro_f1", "perplexity", "n") if k in m}
            except ValueError:
                pass
        try:
            task = (yaml.safe_load(rd.config_file.read_text(encoding="utf-8")) or {}).get("data", {}).get("task")
            info["task"] = task or "classify"
        except (yaml.YAMLError, OSError, AttributeError):
            pass
        return info

    # -- page ------------------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("clmtune.ui").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise UiError(404, f"no such file: {name}")
        text = resources.files("clmtune.ui").joinpath(f"static/{name}").read_text("utf-8")
        kind = {"js": "text/javascript", "css": "text/css", "html": "text/html"}[name.rsplit(".", 1)[1]]
        return Response(text, media_type=f"{kind}; charset=utf-8")

    @app.get("/api/info")
    async def info():
        from clmtune.models.builtin import BUILTIN_MODELS

        from clmtune.tasks import task_names

        return {"workspace": str(ws.root), "upload_limit": upload_limit, "tasks": list(task_names()),
                "methods": list(PEFT_METHODS), "learning_rates": DEFAULT_LEARNING_RATES,
                "models": ["auto", "builtin:gpt2-zh-small", *[f"builtin:{m}" for m in BUILTIN_MODELS]],
                "suffixes": list(DATA_SUFFIXES)}

    # -- data ------------------------------------------------------------------------------------------------------
    @app.get("/api/files")
    async def files():
        return {"files": await run_in_threadpool(ws.data_files)}

    @app.put("/api/upload/{name}")
    async def upload(name: str, request: Request, overwrite: bool = False):
        check_name(name, "file name")
        if not name.lower().endswith(DATA_SUFFIXES):
            raise UiError(400, f"{name}: upload a {', '.join(DATA_SUFFIXES)} file")
        dest = ws.resolve(f"{UPLOADS}/{name}")
        if dest.exists() and not overwrite:
            raise UiError(409, f"{UPLOADS}/{name} exists already; rename the file or upload with overwrite")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{name}.part"
        size = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
                    size += len(chunk)
                    if size > upload_limit:
                        raise UiError(413, f"{name} is over the upload limit of {upload_limit} bytes "
                                           "(copy big files into the workspace instead)")
                    fh.write(chunk)
            if size == 0:
                raise UiError(400, f"{name} is empty")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": ws.rel(dest), "bytes": size}

    @app.get("/api/preview")
    async def preview(path: str = Query(...)):
        from clmtune.data.sources import read_table

        p = ws.resolve(path)
        if not p.is_file():
            raise UiError(404, f"{path}: no such file")

        def read():
            rows = read_table(p)
            columns = list(rows[0].keys()) if rows else []
            text_like = {c: sum(len(str(r.get(c) or "")) for r in rows[:200]) for c in columns}
            distinct = {c: len({str(r.get(c)) for r in rows}) for c in columns}
            label = next((c for c in columns if c.lower() in ("label", "labels", "class", "category", "标签")),
                         min(columns, key=lambda c: distinct[c]) if len(columns) > 1 else None)
            text = max((c for c in columns if c != label), key=lambda c: text_like[c], default=None)
            return {"path": path, "rows": len(rows), "columns": columns, "head": rows[:5],
                    "guess": {"text_column": text, "label_column": label}}

        return await run_in_threadpool(read)

    @app.post("/api/prepare")
    async def prepare(body: YamlBody):
        """`clmtune prepare --json` on the YAML: the report the command line prints, as data."""
        raw = parse_yaml(body.yaml)
        validate(ws, raw)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ws.state, delete=False, encoding="utf-8") as fh:
            fh.write(dump_yaml(raw))
        try:
            proc = await run_in_threadpool(
                subprocess.run, [python, "-m", "clmtune", "prepare", "--config", fh.name, "--json"], cwd=ws.root,
                capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        finally:
            Path(fh.name).unlink(missing_ok=True)
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise UiError(400, last_line(err) or f"clmtune prepare failed (exit status {proc.returncode})")
        return {"report": json.loads(out[out.index("{"):]),
                "warnings": [ln.strip() for ln in err.replace("\r", "\n").splitlines()
                             if "WARNING" in ln or "warning" in ln.lower()][:20]}

    # -- settings --------------------------------------------------------------------------------------------------
    @app.post("/api/config")
    async def config(settings: Settings):
        check_name(settings.name, "run name")
        raw = settings_to_dict(settings)
        validate(ws, raw)
        return {"yaml": dump_yaml(raw), "config": raw}

    @app.post("/api/config/parse")
    async def config_parse(body: YamlBody):
        raw = parse_yaml(body.yaml)
        validate(ws, raw)
        return {"config": raw}

    @app.get("/api/run/config", response_class=PlainTextResponse)
    async def run_config(run: str = Query(...), download: bool = False):
        path = run_path(run)
        headers = {"Content-Disposition": f'attachment; filename="{path.name}.yaml"'} if download else {}
        return PlainTextResponse(RunDir(path).config_file.read_text(encoding="utf-8"), headers=headers,
                                 media_type="text/yaml; charset=utf-8")

    # -- training --------------------------------------------------------------------------------------------------
    @app.post("/api/train")
    async def train(body: YamlBody):
        raw = parse_yaml(body.yaml)
        name = check_name(body.name or Path(str((raw.get("train") or {}).get("output_dir", ""))).name, "run name")
        raw.setdefault("train", {})["output_dir"] = f"{RUNS}/{name}"
        validate(ws, raw)
        out = ws.resolve(f"{RUNS}/{name}")
        if jobs.active_for(ws.rel(out)) is not None:
            raise UiError(409, f"{RUNS}/{name} is already queued or training")
        args = ["train", "--config", f"{CONFIGS}/{name}.yaml"]
        if RunDir(out).config_file.is_file() or (out.is_dir() and any(out.iterdir())):
            if not body.overwrite:
                raise UiError(409, f"{RUNS}/{name} exists already: pick another run name, resume it, or tick "
                                   "overwrite")
            args.append("--overwrite")
        cfg = ws.resolve(f"{CONFIGS}/{name}.yaml")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(dump_yaml(raw), encoding="utf-8")
        job = jobs.submit("train", args, run=ws.rel(out))
        return {**job.public(), "queue_position": jobs.position(job)}

    @app.post("/api/resume")
    async def resume(body: RunBody):
        path = run_path(body.run)
        rel = ws.rel(path)
        if jobs.active_for(rel) is not None:
            raise UiError(409, f"{rel} is already queued or training")
        if RunDir(path).is_finished():
            raise UiError(409, f"{rel} finished already; nothing to resume")
        if not RunDir(path).has_checkpoints():
            raise UiError(409, f"{rel} has no checkpoint to resume from (set train.save_steps); start it again")
        job = jobs.submit("resume", ["train", "--config", f"{rel}/config.yaml", "--resume"], run=rel)
        return {**job.public(), "queue_position": jobs.position(job)}

    @app.get("/api/jobs")
    async def job_list():
        return {"jobs": [{**j.public(), "queue_position": jobs.position(j) if j.status in ACTIVE else None}
                         for j in jobs.list()]}

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str):
        job = jobs.stop(job_id)
        if job is None:
            raise UiError(404, f"no job {job_id}")
        return job.public()

    @app.get("/api/jobs/{job_id}/log", response_class=PlainTextResponse)
    async def job_log(job_id: str, tail: int = Query(20000, ge=1, le=1_000_000)):
        if jobs.get(job_id) is None:
            raise UiError(404, f"no job {job_id}")
        p = jobs.log_path(job_id)
        text = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
        return PlainTextResponse(text[-tail:])

    # -- runs ------------------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def runs():
        paths = await run_in_threadpool(find_runs, ws)
        listed = [run_info(p) for p in paths]
        known = {r["run"] for r in listed}
        for j in reversed(jobs.list()):  # runs the page started that have no run folder (yet): queued, failed early
            if not j.run or j.run in known or j.kind not in ("train", "resume"):
                continue
            known.add(j.run)
            path = ws.resolve(j.run)
            if RunDir(path).config_file.is_file():
                listed.append(run_info(path))
            elif j.status in ACTIVE or j.status == "failed":
                listed.append({"run": j.run, "name": Path(j.run).name, "job": j.id, "modified": j.created,
                               "status": {"queued": "queued", "failed": "failed"}.get(j.status, "running"),
                               "error": j.error, "queue_position": jobs.position(j) if j.status in ACTIVE else None,
                               "progress": progress_of(jobs.log_path(j.id)), "checkpoints": False})
        return {"runs": sorted(listed, key=lambda r: -r["modified"])}

    @app.get("/api/run")
    async def run(run: str = Query(...)):
        path = run_path(run)
        return {**run_info(path), "log": RunDir(path).log_records() if RunDir(path).log_file.is_file() else []}

    @app.get("/api/run/events")
    async def events(request: Request, run: str = Query(...)):
        """Server-sent events: each new train_log.jsonl line (``log``), the run's status when it changes
        (``status``), ``end`` once the run is no longer queued or running."""
        path = ws.resolve(run)
        log_file = RunDir(path).log_file

        async def stream():
            offset, last_status, partial = 0, None, b""
            while not await request.is_disconnected():
                if log_file.is_file():
                    size = log_file.stat().st_size
                    if size < offset:  # a resumed run cut its log back to the checkpoint's step
                        offset, partial = 0, b""
                        yield "event: reset\ndata: {}\n\n"
                    if size > offset:
                        with open(log_file, "rb") as fh:
                            fh.seek(offset)
                            chunk = fh.read(size - offset)
                        offset = size
                        *lines, partial = (partial + chunk).split(b"\n")  # a half-written line waits
                        for ln in lines:
                            if ln.strip():
                                yield f"event: log\ndata: {ln.decode('utf-8', 'replace')}\n\n"
                status = (run_info(path) if RunDir(path).config_file.is_file() else
                          {"run": run, "status": "queued" if (j := jobs.active_for(run)) and j.status == "queued"
                           else "running" if j else "failed", "progress": None,
                           "queue_position": jobs.position(j) if j else None})
                key = json.dumps({k: status.get(k) for k in ("status", "progress", "queue_position", "error")})
                if key != last_status:
                    last_status = key
                    yield f"event: status\ndata: {json.dumps(status, ensure_ascii=False)}\n\n"
                if status["status"] not in ("queued", "running"):
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/eval")
    async def evaluate(body: EvalBody):
        _, rel = finished_run(body.run)
        args = ["eval", "--run", rel]
        if body.data:
            p = ws.resolve(body.data)
            if not p.is_file():
                raise UiError(404, f"{body.data}: no such file")
            args += ["--data", ws.rel(p)]
        else:
            args += ["--split", body.split]
        job = jobs.submit("eval", args, run=rel)
        return {**job.public(), "queue_position": jobs.position(job)}

    @app.post("/api/export")
    async def export(body: ExportBody):
        path, rel = finished_run(body.run)
        to = f"{EXPORTS}/{path.name}-{'merged' if body.merge else 'adapter'}"
        ws.resolve(to)
        args = ["export", "--run", rel, "--to", to, "--overwrite"] + (["--merge"] if body.merge else [])
        job = jobs.submit("export", args, run=rel)
        return {**job.public(), "to": to, "queue_position": jobs.position(job)}

    @app.post("/api/compare")
    async def compare(body: CompareBody):
        """`clmtune report RUN...`: the report stage's own HTML, side by side."""
        rels = [ws.rel(run_path(r)) for r in body.runs]
        name = f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.html"
        out = ws.state / "reports" / name
        proc = await run_in_threadpool(
            subprocess.run, [python, "-m", "clmtune", "report", *rels, "--out", str(out)], cwd=ws.root,
            capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise UiError(400, last_line(proc.stderr.decode("utf-8", "replace")) or "clmtune report failed")
        return {"url": f"/reports/{name}", "runs": rels}

    @app.get("/reports/{name}", include_in_schema=False)
    async def report_file(name: str):
        check_name(name, "report")
        p = ws.resolve(f"{STATE}/reports/{name}")
        if not p.is_file():
            raise UiError(404, f"no report {name}")
        return FileResponse(p, media_type="text/html; charset=utf-8")

    @app.get("/api/run/file")
    async def run_file(run: str = Query(...), name: str = Query(...)):
        """A picture of a run (loss.png, the confusion matrix): only images, only inside the run folder."""
        path = run_path(run)
        p = ws.resolve(f"{ws.rel(path)}/{name}")
        if p.suffix.lower() != ".png" or not p.is_file() or not p.is_relative_to(path):
            raise UiError(404, f"{name}: no such picture in {run}")
        return FileResponse(p, media_type="image/png")

    # -- playground ------------------------------------------------------------------------------------------------
    @app.post("/api/playground")
    async def playground(body: RunBody):
        path = run_path(body.run)
        RunDir(path).check_finished("open the playground of")
        return await run_in_threadpool(play.open, ws.rel(path), path)

    @app.get("/api/playground")
    async def playground_status():
        return play.status()

    async def forward(request: Request, target: str) -> Response:
        if not play.status()["ready"]:
            raise UiError(409, "no playground is open: pick a finished run and press Playground")
        headers = {"Authorization": f"Bearer {play.key}"}
        if "content-type" in request.headers:
            headers["Content-Type"] = request.headers["content-type"]
        body = await request.body()
        client: httpx.AsyncClient = app.state.http
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
        return Response(content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    @app.get("/play/", include_in_schema=False)
    async def play_page(request: Request):
        return await forward(request, "/")

    @app.get("/health", include_in_schema=False)
    async def play_health(request: Request):
        return await forward(request, "/health")

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def play_api(rest: str, request: Request):
        return await forward(request, "/v1/" + rest)

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
