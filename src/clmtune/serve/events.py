"""Waiting for a job's rows: all of them (``finish``), the next event (``next_event``), or as server-sent events
(``stream``). A client that goes away cancels its job, so its rows free their places in the batch and the queue."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from clmtune.serve import schemas as S
from clmtune.serve.batcher import Batcher, Job
from clmtune.serve.http import ApiError

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


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


async def finish(batcher: Batcher, job: Job, request: Request) -> list[tuple[str, str | None, int]]:
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


def stream(batcher: Batcher, job: Job, chunk) -> StreamingResponse:
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
