"""``POST /v1/chat/completions``: OpenAI's chat completions, rendered with the model's chat template; a reply ends
at the template's end-of-turn marker."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Depends, Request

from clmtune.serve import schemas as S
from clmtune.serve.events import finish, stream
from clmtune.serve.state import ServedDep, authorized

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/chat/completions")
async def chat_completions(req: S.ChatRequest, request: Request, served: ServedDep):
    engine = served.engine
    served.check_model(req.model)
    params = served.sampling(req, req.n)
    ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
    marker_ids, marker_texts = engine.chat_stops()  # the reply ends at the template's end-of-turn marker
    params.stop_ids, params.stop = marker_ids, params.stop + marker_texts
    engine.check_fits(ids, params.max_tokens, served.limits.max_prompt_tokens)
    job = served.batcher.submit_generate([ids], params, req.n)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        def chunk(i, text, reason):
            delta = S.Delta(role="assistant", content="") if text is None else \
                S.Delta(content=text or None)
            body = S.ChatCompletionChunk(id=rid, created=now, model=engine.model_id,
                                         choices=[S.ChatChunkChoice(index=i, delta=delta, finish_reason=reason)])
            return json.dumps(body.model_dump(exclude_none=False), ensure_ascii=False)
        return stream(served.batcher, job, chunk)
    rows = await finish(served.batcher, job, request)
    used = sum(t for _, _, t in rows)
    return S.ChatCompletion(id=rid, created=now, model=engine.model_id,
                            choices=[S.ChatChoice(index=i, message=S.AssistantMessage(content=t), finish_reason=f)
                                     for i, (t, f, _) in enumerate(rows)],
                            usage=S.Usage(prompt_tokens=len(ids), completion_tokens=used,
                                          total_tokens=len(ids) + used))
