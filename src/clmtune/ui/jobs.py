"""Background jobs: each is one ``clmtune`` command line (train, eval, export) run as a child process in the
workspace, exactly as a person would type it, so a run started from the page is a CLI run. One job runs at a time
(training, evaluation and export all want every core); the others wait in a queue, in order.

A job's output (stdout and stderr together) goes to ``.clmtune-ui/jobs/<id>.log``, its record to
``<id>.json``; a failure's message is the last line of that output (``clmtune: error: ...`` for a user error).
Stopping sends SIGINT, as Ctrl-C does (``clmtune train`` finishes the optimizer step it is in and saves a
checkpoint when it has them), then SIGTERM, then SIGKILL if the process does not end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ACTIVE = ("queued", "running", "stopping")


@dataclass
class Job:
    id: str
    kind: str
    """train, resume, eval, export"""
    args: list[str]
    """The clmtune arguments (the command line is ``clmtune ARGS``)."""
    run: str | None = None
    """The run folder (workspace-relative) the job writes."""
    status: str = "queued"
    """queued, running, stopping, finished, failed, stopped"""
    returncode: int | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None

    @property
    def command(self) -> str:
        return " ".join(["clmtune", *self.args])

    def public(self) -> dict:
        return {**asdict(self), "command": self.command}


def last_line(text: str) -> str | None:
    """The last non-empty line (progress bars redraw with ``\\r``: those count as lines too)."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("clmtune: error:")]
    return (errors or lines or [None])[-1]


class JobQueue:
    def __init__(self, root: Path, state: Path, python: str = sys.executable, grace_s: float = 60.0):
        self.root, self.dir, self.python, self.grace_s = root, state / "jobs", python, grace_s
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.closed = False
        self._load()
        self.worker = threading.Thread(target=self._work, name="clmtune-ui-jobs", daemon=True)
        self.worker.start()

    def _load(self) -> None:
        """Records of earlier sessions (a job that was running when the page's server ended is not running now)."""
        for f in sorted(self.dir.glob("*.json")):
            try:
                job = Job(**json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            if job.status in ACTIVE:
                job.status, job.error = "stopped", job.error or "the ui server ended before this job finished"
            self.jobs[job.id] = job

    def _save(self, job: Job) -> None:
        tmp = self.dir / f".{job.id}.json.tmp"
        tmp.write_text(json.dumps(asdict(job), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.dir / f"{job.id}.json")

    def log_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.log"

    def submit(self, kind: str, args: list[str], run: str | None = None) -> Job:
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], kind=kind, args=list(args), run=run)
        with self.lock:
            self.jobs[job.id] = job
            self._save(job)
            self.lock.notify_all()
        return job

    def list(self) -> list[Job]:
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def active_for(self, run: str) -> Job | None:
        with self.lock:
            found = [j for j in self.jobs.values() if j.run == run and j.status in ACTIVE]
        return found[-1] if found else None

    def last_for(self, run: str, kinds: tuple[str, ...] = ("train", "resume")) -> Job | None:
        with self.lock:
            found = sorted((j for j in self.jobs.values() if j.run == run and j.kind in kinds), key=lambda j: j.created)
        return found[-1] if found else None

    def position(self, job: Job) -> int:
        """0 for the running job, 1 for the next one, ..."""
        with self.lock:
            waiting = sorted((j for j in self.jobs.values() if j.status in ACTIVE), key=lambda j: j.created)
        return next((i for i, j in enumerate(waiting) if j.id == job.id), -1)

    def stop(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                job.status, job.ended = "stopped", time.time()
                self._save(job)
                return job
            if job.status != "running" or self.proc is None:
                return job
            job.status = "stopping"
            self._save(job)
            proc = self.proc
        threading.Thread(target=self._escalate, args=(proc,), daemon=True).start()
        return job

    def _escalate(self, proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGINT, self.grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)  # its own process group: the dataloader workers etc. too
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _next(self) -> Job | None:
        with self.lock:
            while not self.closed:
                queued = sorted((j for j in self.jobs.values() if j.status == "queued"), key=lambda j: j.created)
                if queued:
                    return queued[0]
                self.lock.wait(timeout=1.0)
        return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            log = self.log_path(job.id)
            with open(log, "wb") as out, self.lock:
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
                self.proc = subprocess.Popen([self.python, "-m", "clmtune", *job.args], cwd=self.root, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                             start_new_session=True)
                job.status, job.started, job.pid = "running", time.time(), self.proc.pid
                self._save(job)
            rc = self.proc.wait()
            with self.lock:
                stopping = job.status == "stopping"
                job.returncode, job.ended, self.proc = rc, time.time(), None
                if rc == 0:
                    job.status = "finished"
                elif stopping:
                    job.status = "stopped"
                else:
                    job.status = "failed"
                    job.error = last_line(log.read_text(encoding="utf-8", errors="replace")[-20000:]) or \
                        f"exit status {rc}"
                self._save(job)
                self.lock.notify_all()

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job is no longer active (tests and scripts)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.jobs[job_id].status in ACTIVE and time.monotonic() < deadline:
                self.lock.wait(timeout=0.2)
            return self.jobs[job_id]

    def close(self) -> None:
        """Stop the running job (as Stop does) and the worker: the server is ending."""
        with self.lock:
            self.closed = True
            running = [j for j in self.jobs.values() if j.status == "running"]
            self.lock.notify_all()
        for j in running:
            self.stop(j.id)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.grace_s + 20)
            except subprocess.TimeoutExpired:
                pass
