"""``POST /v1/classify``: the label of each input (and every label's probability) for a classification run."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from clmtune.serve import schemas as S
from clmtune.serve.events import next_event
from clmtune.serve.http import ApiError
from clmtune.serve.state import ServedDep, authorized

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/classify", response_model=S.ClassifyResponse)
async def classify(req: S.ClassifyRequest, request: Request, served: ServedDep):
    served.check_model(req.model)
    inputs = [req.input] if isinstance(req.input, str) else req.input
    most = served.limits.max_classify_inputs
    if len(inputs) > most:
        raise ApiError(400, f"{len(inputs)} inputs; this server classifies at most {most} per request",
                       param="input")
    prompts = served.engine.encode_classify(inputs)
    job = served.batcher.submit_classify(prompts)
    try:
        event = await next_event(job, request)
    finally:
        if not job.released:
            served.batcher.cancel(job)
    if event[0] == "error":
        raise ApiError(500, f"classification failed: {event[1]}", "server_error")
    data = [S.Classification(index=i, label=max(p, key=p.get), probabilities=p) for i, p in enumerate(event[1])]
    return S.ClassifyResponse(model=served.engine.model_id, data=data)
