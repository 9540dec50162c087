"""The HTTP API (FastAPI): OpenAI-compatible completions and chat completions, classification, and the playground.

Every 4xx/5xx answer is an OpenAI-style error object ``{"error": {"message", "type", "param", "code"}}``; a
request never takes the server down (a failing batch fails only its own requests).
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clmtune.errors import ClmtuneError
from clmtune.serve import schemas as S
from clmtune.serve.batcher import Batcher, Job, QueueFull
from clmtune.serve.engine import Engine, RequestError, Sampling


@dataclass
class Limits:
    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (``None``: whatever fits the model's context with ``max_tokens``)."""
    max_body_bytes: int = 1 << 20
    """Largest request body (413 beyond)."""
    max_queue: int = 64
    """Requests waiting or running at once (429 beyond)."""
    max_batch: int = 16
    """Rows (prompts x n) generated together in one batch; also the most one request may ask for."""
    max_classify_inputs: int = 64


DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    body = S.ErrorResponse(error=S.ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is parsed (by its
    Content-Length, or while a chunked body arrives)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = _error(413, f"the request body is over {self.limit} bytes", "invalid_request_error",
                         code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body here, up to the limit, then hand it on in one piece.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    batcher = Batcher(engine, max_batch=limits.max_batch, max_queue=limits.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="clmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.engine = batcher, engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({err.get('msg')})", "invalid_request_error",
                          code="invalid_json")
        where = ".".join(loc) or "body"
        got = f" (got {err.get('input')!r:.80})" if loc else ""  # the whole body is not echoed back
        return _error(400, f"{where}: {err.get('msg')}{got}", "invalid_request_error", param=where,
                      code=err.get("type"))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError):
        return _error(400, str(exc), "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return _error(429, str(exc), "rate_limit_exceeded", code="queue_full")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def authorized(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        if authorization is None or not secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` (the key given to "
                                "`clmtune serve --api-key` or CLMTUNE_API_KEY)", "invalid_request_error",
                           code="invalid_api_key")

    def card() -> S.ModelCard:
        return S.ModelCard(id=engine.model_id, created=created, task=engine.task_name,
                           labels=engine.labels if engine.classifies else None, chat=engine.chats)

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")

    def sampling(req: S._Sampling, rows: int) -> Sampling:
        max_tokens = req.max_tokens if req.max_tokens is not None else engine.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_over_limit")
        if rows > limits.max_batch:
            raise ApiError(400, f"this request asks for {rows} continuations (prompts x n); the server generates at "
                                f"most {limits.max_batch} per request", param="n")
        if req.temperature == 0 and req.n > 1:
            raise ApiError(400, f"n={req.n} needs sampling: temperature 0 gives one continuation", param="n")
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                        seed=req.seed)

    async def next_event(job: Job, request: Request):
        """The job's next event; a client that went away cancels the job (``finally`` of the caller) instead of
        letting its rows run to the end and hold places in the queue (Starlette does not cancel a non-streaming
        handler when its client disconnects)."""
        get = asyncio.ensure_future(job.events.get())
        try:
            while True:
                now = time.monotonic()
                # checked every DISCONNECT_POLL_S also while events keep coming (a row's tokens arrive faster)
                if now - getattr(request.state, "checked_at", now) >= DISCONNECT_POLL_S:
                    if await request.is_disconnected():
                        raise ApiError(499, "the client closed the request", "invalid_request_error",
                                       code="client_closed")
                    request.state.checked_at = now
                elif not hasattr(request.state, "checked_at"):
                    request.state.checked_at = now
                done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if done:
                    return get.result()
                request.state.checked_at = now - DISCONNECT_POLL_S  # waited a whole period: check next round
        finally:
            get.cancel()

    async def finish(job: Job, request: Request) -> list[tuple[str, str | None, int]]:
        """(text, finish_reason, tokens) per row once all rows ended; cancels the job if this request is
        cancelled, or its client goes away, while it waits."""
        open_rows = job.size
        try:
            while open_rows:
                event = await next_event(job, request)
                if event[0] == "done":
                    open_rows -= 1
                elif event[0] == "error":
                    raise ApiError(500, f"generation failed: {event[1]}", "server_error")
        finally:
            if not job.released:
                batcher.cancel(job)
        return [(r.text, r.finish_reason, len(r.new_ids)) for r in sorted(job.rows, key=lambda r: r.tag)]

    def stream(job: Job, chunk) -> StreamingResponse:
        """Server-sent events: ``chunk(choice, text, finish_reason)`` as text arrives, then ``data: [DONE]``. A
        client that disconnects cancels the generator, which cancels the job (its place is freed)."""

        async def events():
            open_rows = job.size
            try:
                for choice in range(job.size):
                    first = chunk(choice, None, None)
                    if first is not None:
                        yield f"data: {first}\n\n"
                while open_rows:
                    event = await job.events.get()
                    if event[0] == "text":
                        yield f"data: {chunk(event[1], event[2], None)}\n\n"
                    elif event[0] == "done":
                        open_rows -= 1
                        yield f"data: {chunk(event[1], '', event[2])}\n\n"
                    else:
                        body = S.ErrorBody(message=f"generation failed: {event[1]}", type="server_error")
                        yield f"data: {json.dumps({'error': body.model_dump()})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not job.released:
                    batcher.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(resources.files("clmtune.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health", response_model=S.Health)
    async def health():
        return S.Health(model=engine.model_id, task=engine.task_name, chat=engine.chats,
                        labels=engine.labels if engine.classifies else None, auth=api_key is not None,
                        queue=batcher.health())

    @app.get("/v1/models", response_model=S.ModelList, dependencies=[Depends(authorized)])
    async def models():
        return S.ModelList(data=[card()])

    @app.get("/v1/models/{name:path}", response_model=S.ModelCard, dependencies=[Depends(authorized)])
    async def model(name: str):
        check_model(name)
        return card()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: S.CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        params = sampling(req, len(prompts) * req.n)
        ids = [engine.encode_prompt(p) for p in prompts]
        for x in ids:
            engine.check_fits(x, params.max_tokens, limits.max_prompt_tokens)
        job = batcher.submit_generate(ids, params, req.n)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(i, text, reason):
                if text is None:
                    return None
                return json.dumps({"id": rid, "object": "text_completion", "created": now, "model": engine.model_id,
                                   "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]},
                                  ensure_ascii=False)
            return stream(job, chunk)
        rows = await finish(job, request)
        used = sum(t for _, _, t in rows)
        prompt_tokens = sum(map(len, ids))
        return S.Completion(id=rid, created=now, model=engine.model_id,
                            choices=[S.CompletionChoice(index=i, text=t, finish_reason=f)
                                     for i, (t, f, _) in enumerate(rows)],
                            usage=S.Usage(prompt_tokens=prompt_tokens, completion_tokens=used,
                                          total_tokens=prompt_tokens + used))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: S.ChatRequest, request: Request):
        check_model(req.model)
        params = sampling(req, req.n)
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        marker_ids, marker_texts = engine.chat_stops()  # the reply ends at the template's end-of-turn marker
        params.stop_ids, params.stop = marker_ids, params.stop + marker_texts
        engine.check_fits(ids, params.max_tokens, limits.max_prompt_tokens)
        job = batcher.submit_generate([ids], params, req.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(i, text, reason):
                delta = S.Delta(role="assistant", content="") if text is None else \
                    S.Delta(content=text or None)
                body = S.ChatCompletionChunk(id=rid, created=now, model=engine.model_id,
                                             choices=[S.ChatChunkChoice(index=i, delta=delta, finish_reason=reason)])
                return json.dumps(body.model_dump(exclude_none=False), ensure_ascii=False)
            return stream(job, chunk)
        rows = await finish(job, request)
        used = sum(t for _, _, t in rows)
        return S.ChatCompletion(id=rid, created=now, model=engine.model_id,
                                choices=[S.ChatChoice(index=i, message=S.AssistantMessage(content=t), finish_reason=f)
                                         for i, (t, f, _) in enumerate(rows)],
                                usage=S.Usage(prompt_tokens=len(ids), completion_tokens=used,
                                              total_tokens=len(ids) + used))

    @app.post("/v1/classify", response_model=S.ClassifyResponse, dependencies=[Depends(authorized)])
    async def classify(req: S.ClassifyRequest, request: Request):
        check_model(req.model)
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if len(inputs) > limits.max_classify_inputs:
            raise ApiError(400, f"{len(inputs)} inputs; this server classifies at most {limits.max_classify_inputs} "
                                "per request", param="input")
        prompts = engine.encode_classify(inputs)
        job = batcher.submit_classify(prompts)
        try:
            event = await next_event(job, request)
        finally:
            if not job.released:
                batcher.cancel(job)
        if event[0] == "error":
            raise ApiError(500, f"classification failed: {event[1]}", "server_error")
        data = [S.Classification(index=i, label=max(p, key=p.get), probabilities=p) for i, p in enumerate(event[1])]
        return S.ClassifyResponse(model=engine.model_id, data=data)

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
