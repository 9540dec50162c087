"""What every route of the ui shares: its error, the strict request body, and ``Ui`` (the workspace, the job queue
and the playground of one app), which routes receive as a FastAPI dependency (``UiDep``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict

from clmtune.run import RunDir
from clmtune.ui.jobs import JobQueue
from clmtune.ui.playground import Playground
from clmtune.ui.workspace import Workspace


class UiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunBody(Strict):
    run: str


@dataclass
class Ui:
    """One app's state: the routes' only way to the workspace, the jobs and the playground."""

    ws: Workspace
    jobs: JobQueue
    play: Playground
    upload_limit: int
    python: str = sys.executable

    def run_path(self, rel: str) -> Path:
        path = self.ws.resolve(rel)
        if not RunDir(path).config_file.is_file():
            raise UiError(404, f"{rel} is not a run folder (no config.yaml)")
        return path

    def finished_run(self, rel: str) -> tuple[Path, str]:
        """A run folder whose training has finished (evaluate, export): its path and workspace-relative name."""
        path = self.run_path(rel)
        if not RunDir(path).is_finished():
            raise UiError(409, f"{self.ws.rel(path)} has not finished training")
        return path, self.ws.rel(path)


def get_ui(request: Request) -> Ui:
    return request.app.state.ui


UiDep = Annotated[Ui, Depends(get_ui)]
