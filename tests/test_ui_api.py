"""`clmtune ui`'s HTTP API (issue 30) through FastAPI's TestClient: the token, the workspace fence, the upload
limit, typed bodies, the YAML, the job queue (one at a time, stop, the one-line error), the run list, the SSE curve
stream. The queue tests run a stand-in for `python -m clmtune` (a few lines that behave like train does: log lines,
exit codes, Ctrl-C), so they take seconds; test_ui_train_stop_resume runs the real `clmtune train`."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from clmtune.ui.app import create_app  # noqa: E402

TOKEN = "test-token-123"
H = {"X-Clmtune-Token": TOKEN}
CSV = "review,label\n" + "".join(f"房间干净，服务热情{i},好评\n设施陈旧，隔音太差{i},差评\n" for i in range(6))

FAKE = '''
import json, os, signal, sys, time
args = sys.argv[3:]  # python FAKE -m clmtune ARGS...
open("commands.txt", "a").write(" ".join(args) + "\\n")
if args[0] == "train":
    cfg = args[args.index("--config") + 1]
    import yaml
    raw = yaml.safe_load(open(cfg, encoding="utf-8"))
    out = raw["train"]["output_dir"]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "config.yaml"), "w").write(open(cfg).read())
    steps = raw["train"].get("max_steps", 3)
    if raw["train"].get("seed") == 13:
        print("Traceback (most recent call last):\\n  ...", file=sys.stderr)
        print("clmtune: error: data.source 'x.csv' does not exist; check the path", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(out, "train_log.jsonl"), "a") as log:
        try:
            for step in range(1, steps + 1):
                time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
                log.write(json.dumps({"step": step, "epoch": 1, "loss": 3.0 / step}) + "\\n"); log.flush()
                print(f"train:  {100 * step // steps}%|####| {step}/{steps} [00:01<00:00]", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("clmtune: interrupted", file=sys.stderr)
            sys.exit(130)
    os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
    open(os.path.join(out, "adapter", "adapter_config.json"), "w").write("{}")
    open(os.path.join(out, "train_summary.json"), "w").write(json.dumps({"steps": steps, "final_loss": 3.0 / steps}))
sys.exit(0)
'''


@pytest.fixture()
def fake_python(tmp_path):
    script = tmp_path / "fake_clmtune.py"
    script.write_text(FAKE, encoding="utf-8")
    py = tmp_path / "fakepython"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return str(py)


@pytest.fixture()
def ws(tmp_path):
    w = tmp_path / "ws"
    (w / "data").mkdir(parents=True)
    (w / "data" / "reviews.csv").write_text(CSV, encoding="utf-8")
    return w


@pytest.fixture()
def client(ws, fake_python):
    app = create_app(ws, token=TOKEN, upload_limit=4096, python=fake_python, stop_grace_s=5)
    with TestClient(app) as c:
        yield c


def settings(**kw):
    base = {"name": "r1", "source": "data/reviews.csv", "task": "classify", "template": "评论：{review} 评价：",
            "label_column": "label", "model": "builtin:tiny-gpt2-zh", "max_steps": 3}
    return {**base, **kw}


# -- the token -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/api/info", "/api/files", "/api/runs", "/static/app.js", "/v1/models",
                                  "/play/", "/api/run/events?run=runs/x"])
def test_every_request_without_the_token_is_refused(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"X-Clmtune-Token": "wrong"}).status_code == 401
    assert client.get(path + ("&" if "?" in path else "?") + "token=nope").status_code == 401
    assert client.put("/api/upload/a.csv", content=b"x,y\n1,2\n").status_code == 401
    assert client.post("/api/train", json={"yaml": "{}"}).status_code == 401


def test_token_in_the_url_sets_a_same_site_cookie_that_authenticates_the_page(client):
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 200 and "clmtune" in r.text and "https://" not in r.text  # nothing from a CDN
    cookie = r.headers["set-cookie"]
    assert "clmtune_ui_token=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert client.get("/api/info").status_code == 200  # the cookie alone, as the page's fetch() sends it
    for name in ("app.js", "style.css"):
        body = client.get(f"/static/{name}").text
        assert "http://" not in body and "https://" not in body


def test_cli_binds_localhost_by_default():
    from clmtune.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.workspace == "."


# -- the workspace fence -------------------------------------------------------------------------------------------
def test_paths_outside_the_workspace_are_refused(client, ws, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n", encoding="utf-8")
    (ws / "link.csv").symlink_to(secret)  # a symlink that leads out
    (ws / "linkdir").symlink_to(tmp_path)
    for bad in ["../secret.csv", str(secret), "/etc/passwd", "data/../../secret.csv", "link.csv", "linkdir/secret.csv"]:
        r = client.get("/api/preview", params={"path": bad}, headers=H)
        assert r.status_code == 403, (bad, r.text)
    names = [f["path"] for f in client.get("/api/files", headers=H).json()["files"]]
    assert names == ["data/reviews.csv"]  # the escaping link is not listed
    r = client.post("/api/config", json=settings(source="../secret.csv"), headers=H)
    assert r.status_code == 403 and "data.source" in r.json()["error"]
    bad_yaml = yaml.safe_dump({"data": {"source": "data/reviews.csv", "eval_file": "/etc/hosts"}})
    assert client.post("/api/train", json={"yaml": bad_yaml, "name": "x"}, headers=H).status_code == 403
    assert client.post("/api/train", json={"yaml": "{}", "name": "../escape"}, headers=H).status_code == 400
    assert client.get("/api/run/file", params={"run": "runs/../..", "name": "x.png"}, headers=H).status_code == 403


def test_upload_is_saved_confined_and_size_limited(client, ws):
    r = client.put("/api/upload/评论.csv", content=CSV.encode(), headers=H)
    assert r.status_code == 200 and r.json() == {"path": "uploads/评论.csv", "bytes": len(CSV.encode())}
    assert (ws / "uploads" / "评论.csv").read_text(encoding="utf-8") == CSV
    assert client.put("/api/upload/评论.csv", content=b"a,b\n", headers=H).status_code == 409  # no silent overwrite
    assert client.put("/api/upload/评论.csv?overwrite=true", content=b"a,b\n1,2\n", headers=H).status_code == 200
    big = b"a,b\n" + b"1,2\n" * 2000  # 8 KB > the 4 KB limit of this app
    assert client.put("/api/upload/big.csv", content=big, headers=H).status_code == 413

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(10):
            yield b"1,2\n" * 200

    assert client.put("/api/upload/big2.csv", content=chunks(), headers=H).status_code == 413
    assert not (ws / "uploads" / "big.csv").exists() and not (ws / "uploads" / "big2.csv").exists()
    assert not list((ws / "uploads").glob(".*"))  # no partial file left
    assert client.put("/api/upload/evil.sh", content=b"rm -rf /", headers=H).status_code == 400
    assert client.put("/api/upload/..%2Fx.csv", content=b"a\n", headers=H).status_code in (400, 403, 404)
    assert not (ws / "x.csv").exists()


def test_preview_guesses_the_columns(client):
    p = client.get("/api/preview", params={"path": "data/reviews.csv"}, headers=H).json()
    assert p["rows"] == 12 and p["columns"] == ["review", "label"]
    assert p["guess"] == {"text_column": "review", "label_column": "label"}
    assert p["head"][0]["review"] == "房间干净，服务热情0"


# -- settings and YAML ---------------------------------------------------------------------------------------------
def test_settings_become_the_yaml_that_clmtune_train_reads(client, ws):
    from clmtune.config import load_config

    r = client.post("/api/config", json=settings(learning_rate=5e-4, max_train_rows=8), headers=H)
    assert r.status_code == 200
    text = r.json()["yaml"]
    assert "评论：{review} 评价：" in text  # readable Chinese, not \u escapes
    (ws / "c.yaml").write_text(text, encoding="utf-8")
    cfg = load_config(ws / "c.yaml")
    assert (cfg.data.source, cfg.data.template, cfg.data.max_train_rows) == ("data/reviews.csv", "评论：{review} 评价：", 8)
    assert (cfg.train.output_dir, cfg.train.max_steps, cfg.train.learning_rate) == ("runs/r1", 3, 5e-4)
    assert cfg.model.name_or_path == "builtin:tiny-gpt2-zh" and cfg.peft.method == "lora"
    assert client.post("/api/config/parse", json={"yaml": text}, headers=H).json()["config"]["train"]["max_steps"] == 3


def test_bad_settings_get_one_line_naming_the_value(client):
    r = client.post("/api/config", json=settings(method="lorra"), headers=H)
    assert r.status_code == 400 and "peft.method" in r.json()["error"] and "lorra" in r.json()["error"]
    r = client.post("/api/config", json=settings(task="clasify"), headers=H)
    assert r.status_code == 400 and "clasify" in r.json()["error"]
    r = client.post("/api/config", json=settings(epochs=0), headers=H)
    assert r.status_code == 422 and "epochs" in r.json()["error"]
    r = client.post("/api/config", json={**settings(), "unknown": 1}, headers=H)
    assert r.status_code == 422
    r = client.post("/api/config/parse", json={"yaml": "train:\n  batch_size: -3\n"}, headers=H)
    assert r.status_code == 400 and "batch_size" in r.json()["error"] and "\n" not in r.json()["error"]
    r = client.post("/api/config/parse", json={"yaml": "train: [1"}, headers=H)
    assert r.status_code == 400 and "YAML" in r.json()["error"]


# -- jobs ----------------------------------------------------------------------------------------------------------
def start(client, name, **kw):
    text = client.post("/api/config", json=settings(name=name, **kw), headers=H).json()["yaml"]
    r = client.post("/api/train", json={"yaml": text, "name": name}, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_second_start_waits_in_the_queue_and_runs_after_the_first(client, ws, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    jobs = client.app.state.jobs
    a, b = start(client, "first", max_steps=4), start(client, "second", max_steps=2)
    assert a["queue_position"] == 0 and b["queue_position"] == 1
    assert a["command"] == "clmtune train --config configs/first.yaml"  # what a person would type
    runs = {r["run"]: r for r in client.get("/api/runs", headers=H).json()["runs"]}
    assert runs["runs/second"]["status"] == "queued"
    assert jobs.wait(a["id"], 60).status == "finished"
    done_b = jobs.wait(b["id"], 60)
    assert done_b.status == "finished" and done_b.started >= jobs.get(a["id"]).ended  # never two at once
    runs = {r["run"]: r for r in client.get("/api/runs", headers=H).json()["runs"]}
    assert runs["runs/first"]["status"] == runs["runs/second"]["status"] == "finished"
    assert runs["runs/first"]["steps"] == 4
    assert (ws / "configs" / "first.yaml").is_file()
    r = client.post("/api/train", json={"yaml": (ws / "configs" / "first.yaml").read_text(), "name": "first"}, headers=H)
    assert r.status_code == 409 and "exists" in r.json()["error"]  # a finished run is not silently replaced


def test_a_failure_shows_the_one_line_error(client):
    job = start(client, "bad", seed=13)
    done = client.app.state.jobs.wait(job["id"], 60)
    assert done.status == "failed" and done.returncode == 2
    assert done.error == "clmtune: error: data.source 'x.csv' does not exist; check the path"
    run = {r["run"]: r for r in client.get("/api/runs", headers=H).json()["runs"]}["runs/bad"]
    assert run["status"] == "failed" and run["error"] == done.error
    log = client.get(f"/api/jobs/{job['id']}/log", headers=H).text
    assert "Traceback" in log


def test_stop_sends_ctrl_c_and_the_run_is_interrupted(client, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = start(client, "long", max_steps=500)
    jobs = client.app.state.jobs
    deadline = time.monotonic() + 30
    while not client.get("/api/run", params={"run": "runs/long"}, headers=H).json().get("log") if \
            (client.app.state.workspace.root / "runs/long/config.yaml").is_file() else True:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.post(f"/api/jobs/{job['id']}/stop", headers=H).status_code == 200
    done = jobs.wait(job["id"], 30)
    assert done.status == "stopped" and done.returncode == 130  # SIGINT, as Ctrl-C: KeyboardInterrupt in train
    run = client.get("/api/run", params={"run": "runs/long"}, headers=H).json()
    assert run["status"] == "interrupted" and 0 < len(run["log"]) < 500


def test_stopping_a_queued_job_removes_it_from_the_queue(client, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    a, b = start(client, "a1", max_steps=3), start(client, "b1", max_steps=3)
    assert client.post(f"/api/jobs/{b['id']}/stop", headers=H).json()["status"] == "stopped"
    assert client.app.state.jobs.wait(a["id"], 60).status == "finished"
    time.sleep(0.5)
    assert client.app.state.jobs.get(b["id"]).started is None


# -- runs, curves --------------------------------------------------------------------------------------------------
def test_events_stream_the_log_lines_and_the_status(client, ws):
    run = ws / "runs" / "done"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data: {task: classify}\n", encoding="utf-8")
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7, "eval_accuracy": 0.5}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3, "lo',
                                         encoding="utf-8")  # a half-written last line is not sent
    with client.stream("GET", "/api/run/events", params={"run": "runs/done"}, headers=H) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = [(b.split("\n")[0][7:], b.split("\n")[1][6:]) for b in body.strip().split("\n\n")]
    assert [json.loads(d) for e, d in events if e == "log"] == lines
    status = [json.loads(d) for e, d in events if e == "status"]
    assert status[-1]["status"] == "interrupted" and events[-1][0] == "end"


def test_a_run_folder_written_by_the_cli_is_listed_as_finished(client, ws):
    run = ws / "elsewhere" / "cli_run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {task: classify}\n", encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "train_summary.json").write_text(json.dumps({"steps": 7, "final_loss": 0.5}))
    (run / "eval.json").write_text(json.dumps({"method": "rank", "accuracy": 0.75, "n": 4}))
    runs = client.get("/api/runs", headers=H).json()["runs"]
    assert [(r["run"], r["status"], r["steps"], r["eval"]["accuracy"]) for r in runs] == \
        [("elsewhere/cli_run", "finished", 7, 0.75)]
    text = client.get("/api/run/config", params={"run": "elsewhere/cli_run", "download": True}, headers=H)
    assert text.text.startswith("data:") and "attachment" in text.headers["content-disposition"]


@pytest.mark.slow
def test_ui_train_stop_resume(tmp_path, one_thread):
    """The real `clmtune train` child: Stop (SIGINT) leaves a checkpoint of the step it was in, the run shows as
    interrupted, Resume finishes it with all its steps."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "reviews.csv").write_text(CSV * 3, encoding="utf-8")
    app = create_app(ws, token=TOKEN, stop_grace_s=60)
    with TestClient(app) as client:
        job = start(client, "real", model="builtin:tiny-opt", max_steps=120, batch_size=2, template="{review} => ")
        deadline = time.monotonic() + 240
        while len(client.get("/api/run", params={"run": "runs/real"}, headers=H).json().get("log", [])) < 3 \
                if (ws / "runs" / "real" / "config.yaml").is_file() else True:
            assert time.monotonic() < deadline and client.app.state.jobs.get(job["id"]).status in ("queued", "running"), \
                client.get(f"/api/jobs/{job['id']}/log", headers=H).text[-2000:]
            time.sleep(0.2)
        client.post(f"/api/jobs/{job['id']}/stop", headers=H)
        done = client.app.state.jobs.wait(job["id"], 120)
        assert done.status == "stopped" and done.returncode == 130
        run = client.get("/api/run", params={"run": "runs/real"}, headers=H).json()
        assert run["status"] == "interrupted" and run["checkpoints"]
        stopped_at = run["log"][-1]["step"]
        assert 3 <= stopped_at < 120
        assert (ws / "runs" / "real" / "checkpoints" / f"step-{stopped_at:06d}").is_dir()  # the step it was in
        r = client.post("/api/resume", json={"run": "runs/real"}, headers=H)
        assert r.status_code == 200 and r.json()["command"] == "clmtune train --config runs/real/config.yaml --resume"
        assert client.app.state.jobs.wait(r.json()["id"], 300).status == "finished"
        run = client.get("/api/run", params={"run": "runs/real"}, headers=H).json()
        assert run["status"] == "finished" and run["steps"] == 120
        assert [x["step"] for x in run["log"] if "loss" in x] == list(range(1, 121))


def finished_run(ws, name="done"):
    run = ws / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {task: classify}\n", encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "train_summary.json").write_text(json.dumps({"steps": 2, "final_loss": 0.5}))
    return run


def test_eval_and_export_run_the_cli_commands_in_the_queue(client, ws):
    finished_run(ws)
    jobs = client.app.state.jobs
    for body in ({"run": "runs/done"}, {"run": "runs/done", "data": "data/reviews.csv"}):
        j = client.post("/api/eval", json=body, headers=H).json()
        assert jobs.wait(j["id"], 30).status == "finished"
    j = client.post("/api/export", json={"run": "runs/done", "merge": True}, headers=H).json()
    assert j["to"] == "exports/done-merged" and jobs.wait(j["id"], 30).status == "finished"
    assert (ws / "commands.txt").read_text().splitlines() == [
        "eval --run runs/done --split eval", "eval --run runs/done --data data/reviews.csv",
        "export --run runs/done --to exports/done-merged --overwrite --merge"]
    assert client.post("/api/eval", json={"run": "runs/done", "data": "../x.csv"}, headers=H).status_code == 403
    assert client.post("/api/eval", json={"run": "runs/done", "split": "train"}, headers=H).status_code == 422
    assert client.post("/api/export", json={"run": "runs/nope"}, headers=H).status_code == 404


def test_the_playground_needs_a_finished_run(client, ws):
    assert client.post("/v1/classify", json={"input": "x"}, headers=H).status_code == 409  # none open yet
    run = finished_run(ws, "half")
    (run / "train_summary.json").unlink()
    r = client.post("/api/playground", json={"run": "runs/half"}, headers=H)
    assert r.status_code == 400 and "did not finish" in r.json()["error"]


def test_clmtune_ui_prints_a_tokened_localhost_url_and_refuses_requests_without_it(tmp_path):
    import re
    import signal
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clmtune", "ui", "--workspace", str(tmp_path / "w"), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "clmtune ui ended before printing its URL"
            m = re.search(r"(http://127\.0\.0\.1:\d+/\?token=([\w-]+))", line)
            url = m and m.group(1)
        assert url is not None and len(url.rsplit("=", 1)[1]) >= 24
        for _ in range(100):
            try:
                r = httpx.get(url, timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200 and "clmtune ui" in r.text
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/files?token=guess", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert (tmp_path / "w" / ".clmtune-ui").is_dir()


def test_progress_comes_from_the_progress_bar(tmp_path):
    from clmtune.ui.routers.runs import progress_of

    log = tmp_path / "job.log"
    log.write_text("loading\rtrain:   0%|          | 0/40 [00:00<?, ?step/s]\rtrain:  12%|#2        | 5/40 "
                   "[00:01<00:07, 4.9step/s, loss=2.1]", encoding="utf-8")
    assert progress_of(log) == {"step": 5, "total": 40}
    assert progress_of(tmp_path / "missing.log") is None
