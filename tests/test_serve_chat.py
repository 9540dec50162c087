"""`clmtune serve` on a real chat run: /v1/chat/completions renders messages with the template the run saved with
its tokenizer, stops at its end marker, and answers (greedy) exactly what `clmtune chat` answers."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from liveserver import LiveServer


@pytest.mark.slow
def test_chat_completions_through_a_chat_runs_template(chat_run):
    from clmtune.chat import ChatSession
    from clmtune.config import GenerateConfig
    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    run_dir, _ = chat_run
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.load(run=str(run_dir), device="cpu")
        assert engine.tokenizer.chat_template and engine.task_name == "chat" and not engine.classifies
        session = ChatSession(engine.model, engine.tokenizer, GenerateConfig(max_new_tokens=12, temperature=0),
                              system="你是一个友好的助手")
        messages = [{"role": "system", "content": "你是一个友好的助手"}, {"role": "user", "content": "你好"}]
        expected_ids = session.prompt_ids("你好")
        expected = session.send("你好")
        with LiveServer(create_app(engine)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            got = client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=12,
                                                 temperature=0)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=engine.model_id, messages=messages, max_tokens=12, temperature=0, stream=True))
            classify = httpx.post(srv.url + "/v1/classify", json={"input": ["你好"]})
        assert got.usage.prompt_tokens == len(expected_ids)
        assert got.choices[0].message.content == expected == streamed
        assert classify.status_code == 400 and classify.json()["error"]["code"] == "not_a_classifier"
    finally:
        torch.set_num_threads(before)
