"""The HTTP API (FastAPI): OpenAI-compatible completions and chat completions, classification, and the playground.

This module builds the app (lifespan, body limit, error handlers) from the routers in ``routers``, and runs it
(``serve``). Every 4xx/5xx answer is an OpenAI-style error object ``{"error": {"message", "type", "param",
"code"}}`` (``http``); a request never takes the server down (a failing batch fails only its own requests).
"""

from __future__ import annotations

import errno
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from clmtune.errors import ClmtuneError
from clmtune.serve.batcher import Batcher
from clmtune.serve.engine import Engine
from clmtune.serve.http import ApiError, BodyLimit, add_error_handlers
from clmtune.serve.routers import chat, classify, completions, models, playground
from clmtune.serve.state import Limits, Served

__all__ = ["ApiError", "Limits", "bind_socket", "create_app", "serve"]


def create_app(engine: Engine, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    batcher = Batcher(engine, max_batch=limits.max_batch, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="clmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = Served(engine, batcher, limits, api_key, created=int(time.time()))
    app.state.batcher, app.state.engine = batcher, engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    add_error_handlers(app)
    for group in (playground, models, completions, chat, classify):
        app.include_router(group.router)
    return app


def serve(run: str | None = None, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, device: str = "auto", limits: Limits | dict | None = None) -> None:
    """Load the model once and answer HTTP requests until interrupted."""
    import uvicorn

    limits = Limits(**limits) if isinstance(limits, dict) else limits
    sock = bind_socket(host, port)  # before loading the model: a port in use is one line, at once
    try:
        engine = Engine.load(run, model, device)
        app = create_app(engine, api_key, limits)
        port = sock.getsockname()[1]
        print(f"clmtune serve: {engine.model_id} ({engine.task_name}) on http://{host}:{port}/ "
              f"(API: /v1, playground: /){' - API key required' if api_key else ''}", flush=True)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)  # info: one line per request
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def bind_socket(host: str, port: int):
    """A listening socket on ``host:port``, or one line saying why not (port out of range, in use, bad host).
    The server then runs on this socket, so nothing can take the port between the check and serving."""
    import socket

    if not 0 <= port <= 65535:
        raise ClmtuneError(f"--port {port} is not a port number; give one from 1 to 65535 (e.g. 8000)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ClmtuneError(f"--host {host!r} is not an address of this machine ({exc}); use 127.0.0.1 or "
                           "0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a recently closed port is reusable
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ClmtuneError(f"--port {port} on {host} is in use by another program; stop it or pick another "
                               "--port") from None
        raise ClmtuneError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --host or --port") \
            from None
    sock.set_inheritable(True)
    return sock
