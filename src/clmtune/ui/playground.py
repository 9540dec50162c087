"""The playground of a finished run: a ``clmtune serve --run RUN`` child process on a free 127.0.0.1 port with a
random API key, which the page reaches through the ui server (``/play/``, ``/health``, ``/v1/...`` are passed on
with the key added). The serve stage's page, engine and API are used as they are, so what the playground shows is
what ``clmtune serve`` would answer; switching to another run replaces the child (one model in memory at a time).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from clmtune.errors import ClmtuneError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Playground:
    def __init__(self, root: Path, log_dir: Path, python: str = sys.executable):
        self.root, self.log_dir, self.python = root, log_dir, python
        self.run: str | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.key = secrets.token_urlsafe(24)
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        alive = self.proc is not None and self.proc.poll() is None
        return {"run": self.run if alive else None, "ready": alive}

    def open(self, run: str, run_path: Path, timeout: float = 180.0) -> dict:
        """Start (or keep) the child for ``run``; returns its /health once it answers."""
        with self.lock:
            if self.run == run and self.proc is not None and self.proc.poll() is None:
                return self._health()
            self._stop()
            self.port = free_port()
            log = self.log_dir / "playground.log"
            out = open(log, "wb")
            self.proc = subprocess.Popen(
                [self.python, "-m", "clmtune", "serve", "--run", str(run_path), "--host", "127.0.0.1",
                 "--port", str(self.port), "--api-key", self.key, "--max-queue", "16"],
                cwd=self.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            out.close()
            self.run = run
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    from clmtune.ui.jobs import last_line

                    msg = last_line(log.read_text(encoding="utf-8", errors="replace")) or "it ended"
                    self.run, self.proc = None, None
                    raise ClmtuneError(f"the playground for {run} did not start: {msg}")
                try:
                    return self._health()
                except httpx.HTTPError:
                    time.sleep(0.3)
            self._stop()
            raise ClmtuneError(f"the playground for {run} did not answer within {timeout:.0f} s")

    def _health(self) -> dict:
        r = httpx.get(self.base + "/health", timeout=5)
        r.raise_for_status()
        return {**r.json(), "run": self.run}

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc, self.run = None, None

    def close(self) -> None:
        with self.lock:
            self._stop()
