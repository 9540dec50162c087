"""``/health`` (open: the playground and load balancers ask it) and the OpenAI model list."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from clmtune.serve import schemas as S
from clmtune.serve.state import ServedDep, authorized

router = APIRouter()


@router.get("/health", response_model=S.Health)
async def health(served: ServedDep):
    e = served.engine
    return S.Health(model=e.model_id, task=e.task_name, chat=e.chats, labels=e.labels if e.classifies else None,
                    auth=served.api_key is not None, queue=served.batcher.health())


@router.get("/v1/models", response_model=S.ModelList, dependencies=[Depends(authorized)])
async def models(served: ServedDep):
    return S.ModelList(data=[served.card()])


@router.get("/v1/models/{name:path}", response_model=S.ModelCard, dependencies=[Depends(authorized)])
async def model(name: str, served: ServedDep):
    served.check_model(name)
    return served.card()
