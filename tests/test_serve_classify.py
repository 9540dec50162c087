"""`clmtune serve --run` on a trained classification run (issue 15), started through the CLI in a subprocess:
/v1/classify gives each label's probability from rank scoring, checked against a naive forward per label."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

KEY = "k-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained):
    cfg, result = trained
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLMTUNE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "clmtune", "serve", "--run", str(result.output_dir),
                             "--port", str(port), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"clmtune serve did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield url, cfg, result
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "clmtune serve:" in out and "127.0.0.1" in out


def _naive_probabilities(cfg, run_dir, text: str, model, tok) -> dict[str, float]:
    """Each label's log-likelihood from its own full forward of prompt + label + end token, softmaxed."""
    from clmtune.run import RunDir
    from clmtune.tasks.encoding import leading_special_ids

    labels = RunDir(run_dir).labels()
    prompt = leading_special_ids(tok) + tok(cfg.data.template.format(**{"Tweet text": text}),
                                            add_special_tokens=False).input_ids
    end = tok.eos_token_id if cfg.data.end_token == "eos" else tok.pad_token_id
    scores = []
    with torch.no_grad():
        for lab in labels:
            cont = tok(lab, add_special_tokens=False).input_ids + [end]
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)))
    probs = torch.softmax(torch.tensor(scores), 0).tolist()
    return dict(zip(labels, probs))


@pytest.mark.slow
def test_classify_matches_naive_rank_scoring(served):
    url, cfg, result = served
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = ["@comcast my internet has been down for two days", "Thanks @JetBlue, the crew was lovely today",
             "酒店服务很差，再也不来了"]
    r = httpx.post(url + "/v1/classify", headers=auth, json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == result.output_dir.resolve().name and [d["index"] for d in body["data"]] == [0, 1, 2]
    from clmtune.run import RunDir

    model, tok = RunDir(result.output_dir).load_model()
    for text, d in zip(texts, body["data"]):
        expected = _naive_probabilities(cfg, result.output_dir, text, model, tok)
        assert set(d["probabilities"]) == set(expected) == {"complaint", "no complaint"}
        for lab, p in expected.items():
            assert d["probabilities"][lab] == pytest.approx(p, abs=1e-4)
        assert d["label"] == max(expected, key=expected.get)
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_classify_inputs_batch_and_errors(served):
    url, cfg, result = served
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/v1/classify", json={"input": ["x"]}).status_code == 401
    one = httpx.post(url + "/v1/classify", headers=auth, json={"input": "my flight was cancelled"}).json()
    obj = httpx.post(url + "/v1/classify", headers=auth,
                     json={"input": [{"Tweet text": "my flight was cancelled"}]}).json()
    assert one["data"][0]["probabilities"] == pytest.approx(obj["data"][0]["probabilities"], abs=1e-6)
    missing = httpx.post(url + "/v1/classify", headers=auth, json={"input": [{"text": "hi"}]})
    assert missing.status_code == 400 and "Tweet text" in missing.json()["error"]["message"]
    assert httpx.post(url + "/v1/classify", headers=auth, json={"input": []}).status_code == 400
    assert httpx.post(url + "/v1/classify", headers=auth, json={"input": ["  "]}).status_code == 400
    assert httpx.post(url + "/v1/classify", headers=auth, json={"input": [3]}).status_code == 400
    unknown = httpx.post(url + "/v1/classify", headers=auth, json={"model": "other", "input": ["hi"]})
    assert unknown.status_code == 404
    models = httpx.get(url + "/v1/models", headers=auth).json()["data"]
    assert models[0]["task"] == "classify" and models[0]["labels"] == ["complaint", "no complaint"]
    # A classification run is still a language model: completions work too.
    done = httpx.post(url + "/v1/completions", headers=auth,
                      json={"model": models[0]["id"], "prompt": "Tweet text : hello label : ", "max_tokens": 3,
                            "temperature": 0}, timeout=60)
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_a_full_fine_tuning_run_is_served_like_an_adapter_run(tmp_path):
    """peft.method full writes model/ instead of adapter/: `--run` and `--model RUN` both serve it, and its task
    (classify) gives /v1/classify."""
    from tinyrun import tiny_cfg

    from clmtune.run import RunDir
    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine
    from clmtune.train import train
    from liveserver import LiveServer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg(tmp_path, method="full", name="full-run", max_steps=4)
        train(cfg, progress=False)
        run = RunDir(cfg.train.output_dir)
        assert run.has_full_model() and not run.has_adapter()
        engine = Engine.load(model=str(run.path), device="cpu")  # --model RUN: recognised as a run, not a model
        assert engine.classifies and engine.labels == ["complaint", "no complaint"] and engine.model_id == "full-run"
        with LiveServer(create_app(engine)) as srv:
            r = httpx.post(srv.url + "/v1/classify", json={"input": ["@delta where is my bag"]}, timeout=60)
            card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert r.status_code == 200, r.text
        model, tok = run.load_model()
        expected = _naive_probabilities(cfg, run.path, "@delta where is my bag", model, tok)
        assert r.json()["data"][0]["probabilities"] == pytest.approx(expected, abs=1e-4)
        assert card["task"] == "classify" and card["id"] == "full-run"
    finally:
        torch.set_num_threads(before)
