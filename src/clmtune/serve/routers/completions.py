"""``POST /v1/completions``: OpenAI's text completions, one prompt or several, ``n`` continuations each, streamed
or whole."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Depends, Request

from clmtune.serve import schemas as S
from clmtune.serve.events import finish, stream
from clmtune.serve.state import ServedDep, authorized

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/completions")
async def completions(req: S.CompletionRequest, request: Request, served: ServedDep):
    engine, limits = served.engine, served.limits
    served.check_model(req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    params = served.sampling(req, len(prompts) * req.n)
    ids = [engine.encode_prompt(p) for p in prompts]
    for x in ids:
        engine.check_fits(x, params.max_tokens, limits.max_prompt_tokens)
    job = served.batcher.submit_generate(ids, params, req.n)
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        def chunk(i, text, reason):
            if text is None:
                return None
            return json.dumps({"id": rid, "object": "text_completion", "created": now, "model": engine.model_id,
                               "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]},
                              ensure_ascii=False)
        return stream(served.batcher, job, chunk)
    rows = await finish(served.batcher, job, request)
    used = sum(t for _, _, t in rows)
    prompt_tokens = sum(map(len, ids))
    return S.Completion(id=rid, created=now, model=engine.model_id,
                        choices=[S.CompletionChoice(index=i, text=t, finish_reason=f)
                                 for i, (t, f, _) in enumerate(rows)],
                        usage=S.Usage(prompt_tokens=prompt_tokens, completion_tokens=used,
                                      total_tokens=prompt_tokens + used))
