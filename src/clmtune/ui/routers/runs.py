"""The runs of the workspace: where they are, their status (from the run folder and the job queue), their live
training log as server-sent events, their config and pictures, and a side-by-side comparison (``clmtune
report``)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
from pathlib import Path

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from clmtune.errors import ClmtuneError
from clmtune.run import RunDir
from clmtune.ui.common import Strict, Ui, UiDep, UiError
from clmtune.ui.jobs import ACTIVE, last_line
from clmtune.ui.workspace import EXPORTS, STATE, Workspace, check_name

PROGRESS_RE = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")

router = APIRouter()


class CompareBody(Strict):
    runs: list[str] = Field(min_length=1, max_length=8)


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


def run_status(ui: Ui, rel: str, rd: RunDir) -> dict:
    """status, error, job (and queue place and progress while it trains) of one run folder."""
    info = {"status": "interrupted", "error": None, "job": None}
    active, last = ui.jobs.active_for(rel), ui.jobs.last_for(rel)
    if active is not None and active.kind in ("train", "resume"):
        info["status"] = "queued" if active.status == "queued" else "running"
        info["job"] = active.id
        info["queue_position"] = ui.jobs.position(active)
        info["progress"] = progress_of(ui.jobs.log_path(active.id))
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
    return info


def run_results(rd: RunDir) -> dict:
    """What a run folder says about itself: training summary, latest evaluation, task."""
    info = {}
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


def run_info(ui: Ui, path: Path) -> dict:
    rel, rd = ui.ws.rel(path), RunDir(path)
    status = run_status(ui, rel, rd)
    info = {"run": rel, "name": path.name, "status": status.pop("status"), "error": status.pop("error"),
            "job": status.pop("job"), "checkpoints": rd.has_checkpoints(), "modified": rd.config_file.stat().st_mtime}
    return {**info, **status, **run_results(rd)}


@router.get("/api/runs")
async def runs(ui: UiDep):
    paths = await run_in_threadpool(find_runs, ui.ws)
    listed = [run_info(ui, p) for p in paths]
    known = {r["run"] for r in listed}
    for j in reversed(ui.jobs.list()):  # runs the page started that have no run folder (yet): queued, failed early
        if not j.run or j.run in known or j.kind not in ("train", "resume"):
            continue
        known.add(j.run)
        path = ui.ws.resolve(j.run)
        if RunDir(path).config_file.is_file():
            listed.append(run_info(ui, path))
        elif j.status in ACTIVE or j.status == "failed":
            listed.append({"run": j.run, "name": Path(j.run).name, "job": j.id, "modified": j.created,
                           "status": {"queued": "queued", "failed": "failed"}.get(j.status, "running"),
                           "error": j.error, "queue_position": ui.jobs.position(j) if j.status in ACTIVE else None,
                           "progress": progress_of(ui.jobs.log_path(j.id)), "checkpoints": False})
    return {"runs": sorted(listed, key=lambda r: -r["modified"])}


@router.get("/api/run")
async def run(ui: UiDep, run: str = Query(...)):
    path = ui.run_path(run)
    return {**run_info(ui, path), "log": RunDir(path).log_records() if RunDir(path).log_file.is_file() else []}


@router.get("/api/run/config", response_class=PlainTextResponse)
async def run_config(ui: UiDep, run: str = Query(...), download: bool = False):
    path = ui.run_path(run)
    headers = {"Content-Disposition": f'attachment; filename="{path.name}.yaml"'} if download else {}
    return PlainTextResponse(RunDir(path).config_file.read_text(encoding="utf-8"), headers=headers,
                             media_type="text/yaml; charset=utf-8")


def new_log_lines(log_file: Path, state: dict):
    """SSE ``log`` events for the lines appended to ``log_file`` since ``state`` (offset, half-written line)."""
    if not log_file.is_file():
        return
    size = log_file.stat().st_size
    if size < state["offset"]:  # a resumed run cut its log back to the checkpoint's step
        state.update(offset=0, partial=b"")
        yield "event: reset\ndata: {}\n\n"
    if size > state["offset"]:
        with open(log_file, "rb") as fh:
            fh.seek(state["offset"])
            chunk = fh.read(size - state["offset"])
        state["offset"] = size
        *lines, state["partial"] = (state["partial"] + chunk).split(b"\n")  # a half-written line waits
        for ln in lines:
            if ln.strip():
                yield f"event: log\ndata: {ln.decode('utf-8', 'replace')}\n\n"


@router.get("/api/run/events")
async def events(request: Request, ui: UiDep, run: str = Query(...)):
    """Server-sent events: each new train_log.jsonl line (``log``), the run's status when it changes
    (``status``), ``end`` once the run is no longer queued or running."""
    path = ui.ws.resolve(run)
    log_file = RunDir(path).log_file

    async def stream():
        state, last_status = {"offset": 0, "partial": b""}, None
        while not await request.is_disconnected():
            for event in new_log_lines(log_file, state):
                yield event
            status = (run_info(ui, path) if RunDir(path).config_file.is_file() else
                      {"run": run, "status": "queued" if (j := ui.jobs.active_for(run)) and j.status == "queued"
                       else "running" if j else "failed", "progress": None,
                       "queue_position": ui.jobs.position(j) if j else None})
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


@router.get("/api/run/file")
async def run_file(ui: UiDep, run: str = Query(...), name: str = Query(...)):
    """A picture of a run (loss.png, the confusion matrix): only images, only inside the run folder."""
    path = ui.run_path(run)
    p = ui.ws.resolve(f"{ui.ws.rel(path)}/{name}")
    if p.suffix.lower() != ".png" or not p.is_file() or not p.is_relative_to(path):
        raise UiError(404, f"{name}: no such picture in {run}")
    return FileResponse(p, media_type="image/png")


@router.post("/api/compare")
async def compare(body: CompareBody, ui: UiDep):
    """`clmtune report RUN...`: the report stage's own HTML, side by side."""
    rels = [ui.ws.rel(ui.run_path(r)) for r in body.runs]
    name = f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.html"
    out = ui.ws.state / "reports" / name
    proc = await run_in_threadpool(
        subprocess.run, [ui.python, "-m", "clmtune", "report", *rels, "--out", str(out)], cwd=ui.ws.root,
        capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise UiError(400, last_line(proc.stderr.decode("utf-8", "replace")) or "clmtune report failed")
    return {"url": f"/reports/{name}", "runs": rels}


@router.get("/reports/{name}", include_in_schema=False)
async def report_file(name: str, ui: UiDep):
    check_name(name, "report")
    p = ui.ws.resolve(f"{STATE}/reports/{name}")
    if not p.is_file():
        raise UiError(404, f"no report {name}")
    return FileResponse(p, media_type="text/html; charset=utf-8")
