"""Data and settings: the workspace's data files, uploads, a file's preview with a guess of its columns,
``clmtune prepare --json`` on a config, and the settings form turned into (or read from) YAML."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from clmtune.ui.common import UiDep, UiError
from clmtune.ui.jobs import last_line
from clmtune.ui.settings import Settings, YamlBody, dump_yaml, parse_yaml, settings_to_dict, validate
from clmtune.ui.workspace import DATA_SUFFIXES, UPLOADS, check_name

router = APIRouter()


@router.get("/api/files")
async def files(ui: UiDep):
    return {"files": await run_in_threadpool(ui.ws.data_files)}


@router.put("/api/upload/{name}")
async def upload(name: str, request: Request, ui: UiDep, overwrite: bool = False):
    check_name(name, "file name")
    if not name.lower().endswith(DATA_SUFFIXES):
        raise UiError(400, f"{name}: upload a {', '.join(DATA_SUFFIXES)} file")
    dest = ui.ws.resolve(f"{UPLOADS}/{name}")
    if dest.exists() and not overwrite:
        raise UiError(409, f"{UPLOADS}/{name} exists already; rename the file or upload with overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{name}.part"
    size = 0
    try:
        with open(tmp, "wb") as fh:
            async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
                size += len(chunk)
                if size > ui.upload_limit:
                    raise UiError(413, f"{name} is over the upload limit of {ui.upload_limit} bytes "
                                       "(copy big files into the workspace instead)")
                fh.write(chunk)
        if size == 0:
            raise UiError(400, f"{name} is empty")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": ui.ws.rel(dest), "bytes": size}


def preview_table(path: str, p: Path) -> dict:
    """The first rows of a data file, and a guess of its text and label columns."""
    from clmtune.data.sources import read_table

    rows = read_table(p)
    columns = list(rows[0].keys()) if rows else []
    text_like = {c: sum(len(str(r.get(c) or "")) for r in rows[:200]) for c in columns}
    distinct = {c: len({str(r.get(c)) for r in rows}) for c in columns}
    label = next((c for c in columns if c.lower() in ("label", "labels", "class", "category", "标签")),
                 min(columns, key=lambda c: distinct[c]) if len(columns) > 1 else None)
    text = max((c for c in columns if c != label), key=lambda c: text_like[c], default=None)
    return {"path": path, "rows": len(rows), "columns": columns, "head": rows[:5],
            "guess": {"text_column": text, "label_column": label}}


@router.get("/api/preview")
async def preview(ui: UiDep, path: str = Query(...)):
    p = ui.ws.resolve(path)
    if not p.is_file():
        raise UiError(404, f"{path}: no such file")
    return await run_in_threadpool(preview_table, path, p)


@router.post("/api/prepare")
async def prepare(body: YamlBody, ui: UiDep):
    """`clmtune prepare --json` on the YAML: the report the command line prints, as data."""
    raw = parse_yaml(body.yaml)
    validate(ui.ws, raw)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ui.ws.state, delete=False, encoding="utf-8") as fh:
        fh.write(dump_yaml(raw))
    try:
        proc = await run_in_threadpool(
            subprocess.run, [ui.python, "-m", "clmtune", "prepare", "--config", fh.name, "--json"], cwd=ui.ws.root,
            capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    finally:
        Path(fh.name).unlink(missing_ok=True)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise UiError(400, last_line(err) or f"clmtune prepare failed (exit status {proc.returncode})")
    return {"report": json.loads(out[out.index("{"):]),
            "warnings": [ln.strip() for ln in err.replace("\r", "\n").splitlines()
                         if "WARNING" in ln or "warning" in ln.lower()][:20]}


@router.post("/api/config")
async def config(settings: Settings, ui: UiDep):
    check_name(settings.name, "run name")
    raw = settings_to_dict(settings)
    validate(ui.ws, raw)
    return {"yaml": dump_yaml(raw), "config": raw}


@router.post("/api/config/parse")
async def config_parse(body: YamlBody, ui: UiDep):
    raw = parse_yaml(body.yaml)
    validate(ui.ws, raw)
    return {"config": raw}
