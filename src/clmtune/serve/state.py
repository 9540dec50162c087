"""What the routes share: the server's ``Limits``, ``Served`` (the engine, the batcher and the limits of one app,
reached by routes as a FastAPI dependency, ``ServedDep``), the API-key check (the ``authorized`` dependency, as in
FastAPI's security docs) and the checks every generation request goes through."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from clmtune.serve import schemas as S
from clmtune.serve.batcher import Batcher
from clmtune.serve.engine import Engine, Sampling
from clmtune.serve.http import ApiError


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


@dataclass
class Served:
    engine: Engine
    batcher: Batcher
    limits: Limits
    api_key: str | None
    created: int = field(default=0)

    def card(self) -> S.ModelCard:
        e = self.engine
        return S.ModelCard(id=e.model_id, created=self.created, task=e.task_name,
                           labels=e.labels if e.classifies else None, chat=e.chats)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.engine.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.engine.model_id!r}",
                           param="model", code="model_not_found")

    def sampling(self, req: S.SamplingRequest, rows: int) -> Sampling:
        limits = self.limits
        max_tokens = req.max_tokens if req.max_tokens is not None else self.engine.default_max_tokens
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


def get_served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(get_served)]


def authorized(served: ServedDep, authorization: str | None = Header(None)) -> None:
    key = served.api_key
    if key is None:
        return
    if authorization is None or not secrets.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` (the key given to "
                            "`clmtune serve --api-key` or CLMTUNE_API_KEY)", "invalid_request_error",
                       code="invalid_api_key")
