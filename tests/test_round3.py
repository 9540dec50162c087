"""Nothing destroyed, nothing silently wrong (round three): what ``--overwrite`` may replace, duplicate YAML keys,
``train.max_steps``, every evaluation in the report, one-line errors for mismatched adapters, read-only run folders,
the server's edges and unusual data.

Each case is the user's command line through ``clmtune.cli.main`` and asserts the one line, exit 2, and that
nothing on disk changed.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from clmtune.cli import main

REPO = Path(__file__).resolve().parents[1]


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(capsys, args: list[str], *expected: str) -> str:
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    everything = capsys.readouterr().err.strip()
    assert "Traceback" not in everything, everything
    err = everything.splitlines()[-1]  # progress bars may come before the error line
    assert err.startswith("clmtune: error: ") and everything.count("clmtune: error") == 1, everything
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A finished LoRA run (tiny GPT-2, 2 steps) and its training CSV."""
    from tinyrun import twitter_rows

    tmp = tmp_path_factory.mktemp("r3")
    data = twitter_rows(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", "--no-eval", "--data.source", str(data), "--data.eval_fraction", "0.25",
                 "--data.max_length", "48", "--model.name_or_path", "builtin:tiny-gpt2", "--train.batch_size", "3",
                 "--train.max_steps", "2", "--data.labels", "[complaint, no complaint]",
                 "--train.output_dir", str(tmp / "run")]) == 0
    yield tmp
    torch.set_num_threads(threads)


def _copy(run3: Path, tmp_path: Path) -> Path:
    shutil.copytree(run3 / "run", tmp_path / "run")
    return tmp_path / "run"


# ----------------------------------------------------------------------------------------------------------------
# 1. --overwrite replaces only a folder of the same kind written by clmtune


@pytest.mark.slow
def test_prepare_save_overwrite_never_deletes_a_file_a_run_or_the_data(run3, tmp_path, capsys):
    run = _copy(run3, tmp_path)
    csv = tmp_path / "data.csv"
    shutil.copy(run3 / "twitter12.csv", csv)
    common = ["prepare", "--data.source", csv, "--data.labels", "[complaint, no complaint]", "--overwrite"]
    before = _snapshot(csv)
    err = _one_line_error(capsys, [*common, "--save", csv], "is a file", "give a new folder path")
    assert "pass --overwrite" not in err
    assert _snapshot(csv) == before
    run_before = _snapshot(run)
    for target in (run, run / "adapter", run / "tokenizer"):
        err = _one_line_error(capsys, [*common, "--save", target], "run folder", "give a new folder")
        assert "pass --overwrite" not in err
    assert _snapshot(run) == run_before
    # a folder holding the data source
    err = _one_line_error(capsys, [*common, "--save", tmp_path], "give a new folder path")
    assert "pass --overwrite" not in err and csv.is_file()
    # a folder of other files
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    _one_line_error(capsys, [*common, "--save", other], "was not written by", "clmtune_prepared.json")
    assert (other / "todo.txt").read_text() == "keep me"
    # an earlier prepare folder: refused without --overwrite (naming it), replaced with it
    saved = tmp_path / "prepared"
    assert main([str(a) for a in common[:-1] + ["--save", saved]]) == 0
    _one_line_error(capsys, [*common[:-1], "--save", saved], "pass --overwrite to replace it")
    assert main([str(a) for a in [*common, "--save", saved]]) == 0
    assert (saved / "clmtune_prepared.json").is_file()


@pytest.mark.slow
def test_export_overwrite_never_replaces_the_run_or_its_parts(run3, tmp_path, capsys):
    run = _copy(run3, tmp_path)
    before = _snapshot(run)
    for to, merge in ((run, []), (run / "adapter", ["--merge"]), (run / "tokenizer", ["--merge"])):
        err = _one_line_error(capsys, ["export", "--run", run, "--to", to, *merge, "--overwrite"], "run folder")
        assert "--overwrite" not in err
    assert _snapshot(run) == before
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    assert json.loads((out / "clmtune_export.json").read_text())["merge"] is False
    _one_line_error(capsys, ["export", "--run", run, "--to", out], "pass --overwrite to replace it")
    assert main(["export", "--run", str(run), "--to", str(out), "--merge", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    # a folder clmtune did not write, and a file
    other = tmp_path / "mine"
    other.mkdir()
    (other / "a.txt").write_text("x")
    _one_line_error(capsys, ["export", "--run", run, "--to", other, "--overwrite"], "was not written by")
    _one_line_error(capsys, ["export", "--run", run, "--to", other / "a.txt", "--overwrite"], "is a file")
    assert (other / "a.txt").read_text() == "x"


# ----------------------------------------------------------------------------------------------------------------
# 2. the config file: duplicate keys, empty, a folder; two output folders


@pytest.mark.parametrize("text, expected", [
    ("train:\n  learning_rate: 5.0\ndata:\n  seed: 1\ntrain:\n  max_steps: 80\n",
     "key 'train' appears twice (lines 1 and 5)"),
    ("train:\n  max_steps: 3\n  max_steps: 80\n", "key 'max_steps' appears twice (lines 2 and 3)"),
    ("# only a comment\n", "is empty (no settings)"),
])
def test_config_file_duplicate_keys_and_empty_are_refused(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text, encoding="utf-8")
    _one_line_error(capsys, ["train", "--config", cfg, "--train.output_dir", tmp_path / "o"], expected)
    assert not (tmp_path / "o").exists()


def test_config_folder_and_two_output_folders_are_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 1\n", encoding="utf-8")
    _one_line_error(capsys, ["train", "--config", tmp_path], "is a folder", f"give {tmp_path / 'config.yaml'}")
    _one_line_error(capsys, ["train", "--output-dir", tmp_path / "a", "--train.output_dir", tmp_path / "b"],
                    "name two folders")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. train.max_steps is the number of steps trained; warm-up longer than the training is warned about


@pytest.mark.slow
def test_max_steps_trains_that_many_steps_whatever_the_epochs(tmp_path, one_thread, caplog):
    from tinyrun import tiny_cfg

    from clmtune.train import train

    # 9 training rows, batch 9: one step per epoch; 1 epoch would stop after 1 step if max_steps were a cap
    cfg = tiny_cfg(tmp_path, model="builtin:tiny-gpt2", epochs=1, max_steps=5, warmup_steps=8)
    with caplog.at_level("WARNING"):
        result = train(cfg, progress=False)
    assert result.steps == 5
    log = [json.loads(ln) for ln in (Path(cfg.train.output_dir) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5 and log[-1]["epoch"] == 5
    assert "train.warmup_steps=8 is not shorter than the training (5 steps)" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# 4. the report lists every evaluation; held-out stays held-out after `eval --data FILE`


@pytest.mark.slow
def test_report_lists_every_evaluation_and_keeps_the_held_out_one(run3, tmp_path, capsys):
    from html import escape

    from clmtune.report.runs import read_run

    run = _copy(run3, tmp_path)
    assert main(["eval", "--run", str(run)]) == 0
    held = json.loads((run / "eval.json").read_text())
    other = tmp_path / "new.csv"
    rows = (run3 / "twitter12.csv").read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(rows[:1] + rows[1:6]) + "\n", encoding="utf-8")
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("ID,Tweet text\n1,my flight is late again\n2,thanks for the quick help\n", encoding="utf-8")
    assert main(["eval", "--run", str(run), "--data", str(other)]) == 0
    assert main(["eval", "--run", str(run), "--data", str(unlabelled)]) == 0
    with open(run / "eval" / "file-unlabelled-rank" / "predictions_text.csv", encoding="utf-8") as fh:
        texts = list(csv.DictReader(fh))  # an unlabelled file's predictions next to their texts
    assert [r["id"] for r in texts] == ["1", "2"] and "my flight is late again" in texts[0]["text"]
    assert texts[0]["predicted"] in ("complaint", "no complaint")
    report = read_run(run)
    assert set(report.evals) == {"eval/eval-rank", "eval/file-new-rank", "eval/file-unlabelled-rank"}
    assert report.eval["accuracy"] == held["accuracy"] and report.eval_on == "held-out"
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"run: eval/eval-rank  (held-out, rank)  accuracy {held['accuracy']:.4f}" in printed, printed
    assert "run: eval/file-new-rank  (file new.csv, rank)" in printed
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Final metrics (held-out split)" in page
    table = page.split("<h3>Evaluations</h3>")[1].split("</table>")[0]
    for folder, on in (("eval/eval-rank", "held-out"), ("eval/file-new-rank", "file new.csv"),
                       ("eval/file-unlabelled-rank", "file unlabelled.csv")):
        assert f"<th>{escape(folder)}</th><td>{escape(on)}</td>" in table, table
    assert "held-out rows" in page and "new.csv" in page


# ----------------------------------------------------------------------------------------------------------------
# 6. an adapter that does not fit the base model: one line in eval (and serve, which loads the same way)


@pytest.mark.slow
def test_adapter_that_does_not_fit_the_base_is_one_line(run3, tmp_path, capsys):
    import yaml

    run = _copy(run3, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["model"]["name_or_path"] = "builtin:gpt2-zh-small"  # config.yaml edited: a wider GPT-2 than trained on
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    _one_line_error(capsys, ["eval", "--run", run], "does not fit the base model", "size mismatch for",
                    "use the config.yaml the adapter was trained with")
    from clmtune.errors import ClmtuneError
    from clmtune.serve.engine import Engine

    with pytest.raises(ClmtuneError, match="does not fit the base model"):
        Engine.load(run=str(run), device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# 7. a read-only run folder: checked first; eval and report with --out elsewhere work


@pytest.fixture
def read_only_run(run3, tmp_path):
    """A copy of the run, bind-mounted read-only onto itself (a real EROFS, which root cannot write either)."""
    import subprocess

    run = _copy(run3, tmp_path)
    assert main(["eval", "--run", str(run)]) == 0  # an earlier evaluation the report can show
    mounted = subprocess.run(["mount", "--bind", str(run), str(run)], capture_output=True).returncode == 0
    if mounted:
        mounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(run)], capture_output=True).returncode == 0
        if not mounted:
            subprocess.run(["umount", str(run)], check=False)
    if not mounted:
        pytest.skip("cannot bind-mount a folder read-only here (needs root with CAP_SYS_ADMIN)")
    try:
        yield run
    finally:
        subprocess.run(["umount", str(run)], check=False)


@pytest.mark.slow
def test_read_only_run_eval_and_report(read_only_run, tmp_path, capsys):
    run = read_only_run
    before = _snapshot(run)
    _one_line_error(capsys, ["eval", "--run", run], "read-only", "pass --out DIR")
    out = tmp_path / "elsewhere"
    assert main(["eval", "--run", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["n"] > 0
    _one_line_error(capsys, ["report", run], "read-only", "pass --out FILE")
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert "Final metrics (held-out split)" in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert _snapshot(run) == before


@pytest.mark.slow
def test_eval_of_a_run_being_trained_names_the_pid(run3, tmp_path, capsys):
    import os
    import socket

    run = _copy(run3, tmp_path)
    (run / "train_summary.json").unlink()  # training has not finished yet ...
    (run / ".clmtune.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "command": "clmtune train", "started": "now"}))  # ... and runs
    _one_line_error(capsys, ["eval", "--run", run], f"being trained now by pid {os.getpid()}", "wait until it finishes")


# ----------------------------------------------------------------------------------------------------------------
# 8. the server's edges: lone surrogates are a 400, a bad or busy port is one line before the model loads


@pytest.mark.slow
def test_lone_surrogates_are_400_in_all_three_endpoints(run3):
    import httpx
    from liveserver import CHAT_TEMPLATE, LiveServer

    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    engine = Engine.load(run=str(run3 / "run"), device="cpu")
    engine.tokenizer.chat_template = engine.request_tokenizer.chat_template = CHAT_TEMPLATE
    bodies = {"/v1/completions": '{"model": "run", "prompt": "abc\\ud800def", "max_tokens": 2}',
              "/v1/chat/completions": '{"model": "run", "messages": [{"role": "user", "content": "abc\\udc00"}]}',
              "/v1/classify": '{"input": ["fine", "abc\\ud800def"]}'}
    with LiveServer(create_app(engine)) as srv:
        for path, body in bodies.items():
            r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code == 400, (path, r.status_code, r.text)
            msg = r.json()["error"]["message"]
            assert "lone UTF-16 surrogate" in msg and "\n" not in msg, msg
        ok = httpx.post(srv.url + "/v1/classify", json={"input": "my flight was cancelled"}, timeout=60)
        assert ok.status_code == 200


def test_bad_port_and_port_in_use_are_one_line_before_loading(monkeypatch, capsys):
    import socket

    from clmtune.serve.engine import Engine

    def never(*a, **k):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: never()))
    _one_line_error(capsys, ["serve", "--model", "builtin:tiny-opt", "--port", "99999"],
                    "--port 99999 is not a port number")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        err = _one_line_error(capsys, ["serve", "--model", "builtin:tiny-opt", "--port", port], f"--port {port}",
                              "is in use")
    finally:
        busy.close()
    assert "serve:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# 9. a Parquet column of structs is flattened to column.field, never trained on as Python repr


@pytest.mark.slow
def test_parquet_struct_column_is_flattened_not_repr(tmp_path, capsys):
    import pandas as pd

    from clmtune.data.sources import read_table

    rows = [{"text": {"body": f"review {i} good" if i % 2 else f"review {i} bad", "lang": "en"},
             "label": "good" if i % 2 else "bad"} for i in range(12)]
    path = tmp_path / "s.parquet"
    pd.DataFrame(rows).to_parquet(path)
    read = read_table(path)
    assert read[1] == {"text.body": "review 1 good", "text.lang": "en", "label": "good"}
    common = ["prepare", "--data.source", path, "--data.label_column", "label"]
    _one_line_error(capsys, [*common, "--data.template", "{text} :"], "'text.body'")
    capsys.readouterr()
    assert main([str(a) for a in [*common, "--data.template", "{text.body} :"]]) == 0
    # a list column used as text is refused, not turned into "['a', 'b']"
    pd.DataFrame([{"text": ["a", "b"], "label": "good"}, {"text": ["c"], "label": "bad"}] * 4).to_parquet(path)
    _one_line_error(capsys, [*common, "--data.template", "{text} :"], "column 'text' holds lists, not text")


# ----------------------------------------------------------------------------------------------------------------
# 10. the run folder deleted during training: one line, no partial folder recreated


@pytest.mark.slow
def test_run_folder_deleted_during_training_is_one_line(tmp_path, monkeypatch, capsys, one_thread):
    from tinyrun import twitter_rows

    from clmtune.train import TrainRecipe

    fit = TrainRecipe.fit

    def fit_then_delete(self):
        out = fit(self)
        shutil.rmtree(self.run.path)
        return out

    monkeypatch.setattr(TrainRecipe, "fit", fit_then_delete)
    run = tmp_path / "run"
    _one_line_error(capsys, ["train", "--no-eval", "--data.source", twitter_rows(tmp_path), "--data.max_length", "48",
                             "--model.name_or_path", "builtin:tiny-gpt2", "--train.max_steps", "1",
                             "--data.labels", "[complaint, no complaint]", "--train.output_dir", run],
                    "was deleted or replaced while training", "nothing was saved")
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------------
# Unclear -> clear: encodings, empty-looking rows, label sets


def _csv(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding, errors="ignore"))  # (tweets hold a few characters gbk lacks)
    return path


GOOD_BAD = "text,label\nnice room,good\nbad room,bad\nfine stay,good\nawful,bad\nlovely,good\nugly,bad\n"


def test_utf16_with_a_byte_order_mark_is_named(tmp_path, capsys):
    path = _csv(tmp_path, "u16.csv", GOOD_BAD, "utf-16")
    common = ["prepare", "--data.source", path, "--data.template", "{text} :", "--data.label_column", "label"]
    err = _one_line_error(capsys, common, "is UTF-16 (little-endian) text", "data.encoding: utf-16")
    assert "gbk" not in err
    assert main([str(a) for a in [*common, "--data.encoding", "utf-16"]]) == 0


@pytest.mark.slow
def test_eval_data_takes_the_encoding_of_its_file(run3, tmp_path, capsys):
    rows = (run3 / "twitter12.csv").read_text(encoding="utf-8")
    path = _csv(tmp_path, "gbk.csv", rows.replace("@", "＠投诉"), "gbk")
    _one_line_error(capsys, ["eval", "--run", run3 / "run", "--data", path, "--out", tmp_path / "o"], "is not utf-8")
    assert main(["eval", "--run", str(run3 / "run"), "--data", str(path), "--data.encoding", "gbk",
                 "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["n"] == 12
    _one_line_error(capsys, ["eval", "--run", run3 / "run", "--data.encoding", "gbk"], "give --data FILE")


def test_zero_width_rows_are_empty_and_labels_empty_list_is_refused(tmp_path, capsys, caplog):
    from clmtune.config import DataConfig
    from clmtune.data import load_task

    path = _csv(tmp_path, "zw.csv", GOOD_BAD + "\u200b\u200b,good\n \ufeff\u2060 ,bad\n")
    data = load_task(DataConfig(source=str(path), template="{text} :", label_column="label", eval_fraction=0))
    assert data.report["dropped_empty"]["train"] == 2 and len(data.train) == 6
    _one_line_error(capsys, ["prepare", "--data.source", path, "--data.template", "{text} :",
                             "--data.label_column", "label", "--data.labels", "[]"], "data.labels=[] names no label")


def test_one_class_warns_and_a_long_label_set_is_summarised(tmp_path, capsys, caplog):
    from clmtune.config import DataConfig
    from clmtune.data import load_task

    path = _csv(tmp_path, "one.csv", "text,label\n" + "".join(f"row {i},good\n" for i in range(8)))
    with caplog.at_level("WARNING"):
        load_task(DataConfig(source=str(path), template="{text} :", label_column="label", eval_fraction=0,
                             labels=["good", "bad"]))
    assert "the training rows hold one class only ('good', 8 rows)" in caplog.text and "'bad'" in caplog.text
    labels = [f"category number {i}" for i in range(96)]
    path = _csv(tmp_path, "many.csv", "text,label\n" + "".join(f"row {i},{labels[i]}\n" for i in range(96))
                + "row x,not a label\n")
    err = _one_line_error(capsys, ["prepare", "--data.source", path, "--data.template", "{text} :",
                                   "--data.label_column", "label", "--data.labels", "[" + ", ".join(labels) + "]"],
                          "not in the label set of 96 label(s)", "... 86 more")
    assert len(err) < 600, len(err)


# ----------------------------------------------------------------------------------------------------------------
# Dependency floors: what `make test-floors` installs is what pyproject.toml claims


def test_floor_constraints_match_pyproject():
    import re
    import tomllib

    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    floors = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in deps if ">=" in d)
    pinned = dict(ln.split("==") for ln in (REPO / "constraints-floors.txt").read_text().split("\n")
                  if ln.strip() and not ln.startswith("#"))
    assert set(pinned) == {"transformers", "peft", "accelerate", "datasets"}
    assert {k: Version(floors[k]) for k in pinned} == {k: Version(v) for k, v in pinned.items()}
    torch_pin = next(ln.split("==")[1] for ln in (REPO / "constraints.txt").read_text().split("\n")
                     if ln.startswith("torch=="))
    assert Version(floors["torch"]) == Version(torch_pin)  # the torch tested is the floor


def test_cache_helpers_take_either_name():
    from types import SimpleNamespace

    from clmtune.models import cache_kwarg, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return SimpleNamespace(logits=None, past_key_values="old")

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return SimpleNamespace(logits=None, cache="new", past_key_values=None)

    assert cache_kwarg(Old()) == "past_key_values" and output_cache(Old()(None)) == "old"
    assert cache_kwarg(New()) == "cache" and output_cache(New()(None)) == "new"


def test_a_symlink_loop_is_named(tmp_path, capsys):
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    (tmp_path / "gone.csv").symlink_to(tmp_path / "nothing.csv")
    _one_line_error(capsys, ["prepare", "--data.source", tmp_path / "a.csv"], "is a symbolic link that loops")
    _one_line_error(capsys, ["prepare", "--data.source", tmp_path / "gone.csv"], "nothing.csv', which does not exist")


def test_a_rising_held_out_loss_is_warned_about(caplog):
    from types import SimpleNamespace

    from clmtune.train.watch import Watch

    train = SimpleNamespace(eval_steps=10, early_stopping_patience=None, save_best=None, report_to=[])
    w = Watch(SimpleNamespace(train=train, main=True))
    w.losses = [(10, 2.61), (20, 2.50), (30, 4.16)]
    with caplog.at_level("WARNING"):
        assert w.finish(None) is None
    assert "the held-out loss rose to 4.1600 at step 30 from 2.5000 at step 20" in caplog.text
    caplog.clear()
    w.losses = [(10, 2.61), (20, 2.50), (30, 2.55)]  # within 10 % of the best: no warning
    with caplog.at_level("WARNING"):
        w.finish(None)
    assert "rose" not in caplog.text


def test_train_overwrite_refuses_a_folder_that_holds_the_data(tmp_path, capsys):
    from tinyrun import twitter_rows

    data = twitter_rows(tmp_path)
    before = _snapshot(tmp_path)
    _one_line_error(capsys, ["train", "--data.source", data, "--output-dir", tmp_path, "--overwrite",
                             "--train.max_steps", "1"], f"holds the data {data}", "another folder")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_non_streaming_request_whose_client_left_is_cancelled(monkeypatch):
    import time

    import httpx
    from liveserver import LiveServer

    from clmtune.serve.app import create_app
    from clmtune.serve.engine import Engine

    engine = Engine.load(model="builtin:tiny-gpt2-zh", device="cpu")
    forward = engine._forward

    def slow_forward(*a, **k):  # 200 tokens: ~10 s of generation
        time.sleep(0.05)
        return forward(*a, **k)

    monkeypatch.setattr(engine, "_forward", slow_forward)
    with LiveServer(create_app(engine)) as srv:
        body = {"model": engine.model_id, "prompt": "今天天气", "max_tokens": 200, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=1.0)  # the client gives up and leaves
        t0 = time.perf_counter()
        while srv.health()["queue"]["in_flight"] and time.perf_counter() - t0 < 5:
            time.sleep(0.1)
        assert srv.health()["queue"]["in_flight"] == 0, srv.health()  # cancelled, not run for ~10 s


def test_hf_source_goes_offline_at_once_when_the_hub_cannot_be_reached(monkeypatch, capsys):
    import socket

    import datasets
    import huggingface_hub.constants as hub

    seen = []

    def load_dataset(name, subset=None):
        seen.append((hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub (OfflineModeIsEnabled)")

    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    _one_line_error(capsys, ["prepare", "--data.source", "hf:someone/data"], "could not load 'someone/data'")
    assert seen == [(True, True)]  # offline while loading: the cache or an error at once, no retries
    assert (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)  # and back afterwards


def test_rows_the_tokenizer_cannot_read_are_counted_and_warned(tmp_path, caplog):
    from clmtune.config import DataConfig, ModelConfig
    from clmtune.data import prepare_data
    from clmtune.models import load_tokenizer

    path = _csv(tmp_path, "emoji.csv", "review,label\n今天很开心😀,好评\n太差了😡😡,差评\n不错,好评\n很糟糕,差评\n")
    tok = load_tokenizer(ModelConfig("builtin:tiny-gpt2-zh"))  # BERT Chinese characters: no emoji
    with caplog.at_level("WARNING"):
        prep = prepare_data(tok, DataConfig(source=str(path), template="{review}：", label_column="label",
                                            eval_fraction=0, max_length=32))
    assert prep.report["splits"]["train"]["rows_with_unknown_tokens"] == 2
    assert "2 of 4 training rows hold text the tokenizer does not know" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a byte-level BPE reads everything; its unk is the end token: no warning
        prepare_data(load_tokenizer(ModelConfig("builtin:tiny-opt")),
                     DataConfig(source=str(path), template="{review}：", label_column="label", eval_fraction=0,
                                max_length=32))
    assert "does not know" not in caplog.text
