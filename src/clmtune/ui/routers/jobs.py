"""Work on runs, each a ``clmtune`` command in the job queue: train (from YAML), resume, evaluate, export; and the
queue itself (list, stop, a job's output)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from clmtune.run import RunDir
from clmtune.ui.common import RunBody, Strict, UiDep, UiError
from clmtune.ui.jobs import ACTIVE
from clmtune.ui.settings import YamlBody, dump_yaml, parse_yaml, validate
from clmtune.ui.workspace import CONFIGS, EXPORTS, RUNS, check_name

router = APIRouter()


class EvalBody(Strict):
    run: str
    split: Literal["eval", "test"] = "eval"
    data: str | None = None


class ExportBody(Strict):
    run: str
    merge: bool = False


def submitted(ui, kind: str, args: list[str], run: str, **more) -> dict:
    job = ui.jobs.submit(kind, args, run=run)
    return {**job.public(), **more, "queue_position": ui.jobs.position(job)}


@router.post("/api/train")
async def train(body: YamlBody, ui: UiDep):
    raw = parse_yaml(body.yaml)
    name = check_name(body.name or Path(str((raw.get("train") or {}).get("output_dir", ""))).name, "run name")
    raw.setdefault("train", {})["output_dir"] = f"{RUNS}/{name}"
    validate(ui.ws, raw)
    out = ui.ws.resolve(f"{RUNS}/{name}")
    if ui.jobs.active_for(ui.ws.rel(out)) is not None:
        raise UiError(409, f"{RUNS}/{name} is already queued or training")
    args = ["train", "--config", f"{CONFIGS}/{name}.yaml"]
    if RunDir(out).config_file.is_file() or (out.is_dir() and any(out.iterdir())):
        if not body.overwrite:
            raise UiError(409, f"{RUNS}/{name} exists already: pick another run name, resume it, or tick "
                               "overwrite")
        args.append("--overwrite")
    cfg = ui.ws.resolve(f"{CONFIGS}/{name}.yaml")
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(dump_yaml(raw), encoding="utf-8")
    return submitted(ui, "train", args, ui.ws.rel(out))


@router.post("/api/resume")
async def resume(body: RunBody, ui: UiDep):
    path = ui.run_path(body.run)
    rel = ui.ws.rel(path)
    if ui.jobs.active_for(rel) is not None:
        raise UiError(409, f"{rel} is already queued or training")
    if RunDir(path).is_finished():
        raise UiError(409, f"{rel} finished already; nothing to resume")
    if not RunDir(path).has_checkpoints():
        raise UiError(409, f"{rel} has no checkpoint to resume from (set train.save_steps); start it again")
    return submitted(ui, "resume", ["train", "--config", f"{rel}/config.yaml", "--resume"], rel)


@router.post("/api/eval")
async def evaluate(body: EvalBody, ui: UiDep):
    _, rel = ui.finished_run(body.run)
    args = ["eval", "--run", rel]
    if body.data:
        p = ui.ws.resolve(body.data)
        if not p.is_file():
            raise UiError(404, f"{body.data}: no such file")
        args += ["--data", ui.ws.rel(p)]
    else:
        args += ["--split", body.split]
    return submitted(ui, "eval", args, rel)


@router.post("/api/export")
async def export(body: ExportBody, ui: UiDep):
    path, rel = ui.finished_run(body.run)
    to = f"{EXPORTS}/{path.name}-{'merged' if body.merge else 'adapter'}"
    ui.ws.resolve(to)
    args = ["export", "--run", rel, "--to", to, "--overwrite"] + (["--merge"] if body.merge else [])
    return submitted(ui, "export", args, rel, to=to)


@router.get("/api/jobs")
async def job_list(ui: UiDep):
    return {"jobs": [{**j.public(), "queue_position": ui.jobs.position(j) if j.status in ACTIVE else None}
                     for j in ui.jobs.list()]}


@router.post("/api/jobs/{job_id}/stop")
async def stop(job_id: str, ui: UiDep):
    job = ui.jobs.stop(job_id)
    if job is None:
        raise UiError(404, f"no job {job_id}")
    return job.public()


@router.get("/api/jobs/{job_id}/log", response_class=PlainTextResponse)
async def job_log(job_id: str, ui: UiDep, tail: int = Query(20000, ge=1, le=1_000_000)):
    if ui.jobs.get(job_id) is None:
        raise UiError(404, f"no job {job_id}")
    p = ui.jobs.log_path(job_id)
    text = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
    return PlainTextResponse(text[-tail:])
