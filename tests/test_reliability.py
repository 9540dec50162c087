"""Reliability: bad input gives one clear line (exit 2), never a traceback or a silently wrong model.

Table-driven: each case is the user's command line (run through ``clmtune.cli.main``) over files the case writes,
and the one-line error it must print. File-system helpers (atomic folders, the folder lock, disk-full errors) are
tested on real folders, with a patched write where a fault cannot be made for real.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tinyrun import one_thread  # noqa: F401  (fixture)

from clmtune.cli import main
from clmtune.errors import ClmtuneError
from clmtune.fsutil import (LOCK_NAME, FolderLock, atomic_folder, atomic_write_json, check_writable, clean_stale_tmp,
                            tmp_sibling)

TWEETS = "src/clmtune/assets/raft/twitter_complaints/train.csv"

# name of a file the case needs -> its content; "{tmp}" in arguments is the case's folder.
FILES = {
    "list.yaml": "- data\n- train\n",
    "string.yaml": "just some text\n",
    "train5.yaml": "train: 5\n",
    "lists.yaml": "data: [a, b]\ntrain: [max_steps]\n",
    "inf.yaml": "train:\n  learning_rate: .inf\n",
    "nan.yaml": "train:\n  learning_rate: nan\n",
    "many.yaml": "train:\n  max_steps: abc\n  batch_size: -1\n  learning_rate: .nan\ndata:\n  template: '{x:>9}'\n",
    "unclosed.csv": 'text,label\n"great hotel,good\nbad room,bad\nok,good\n',
    "merged.csv": 'text,label\n"great hotel,good\nbad room,bad\nok",good\nnice,good\nawful,bad\nfine,good\n',
    "badquote.csv": 'text,label\n"great hotel,good\nbad room,bad\n"ok",good\nnice,good\n',
    "dupcols.csv": "text,text,label\na,b,good\nc,d,bad\n",
    "dupkeys.jsonl": '{"text": "a", "text": "b", "label": "good"}\n',
    "empty.csv": "",
    "header.csv": "text,label\n",
    "emoji.csv": "text,label\n我很开心,😀\n我很生气,😡\n今天不错,😀\n太差了,😡\n",
    "case.csv": "text,label\nnice room,Good\nbad room,good\nfine,Good\nawful,good\n",
    "dotted.csv": "review.text,label\nnice room,good\nbad room,bad\nfine,good\nawful,bad\nok,good\n",
}

CASES = [  # (id, arguments, expected text of the one line)
    ("config-list", ["train", "--config", "{tmp}/list.yaml"], "list.yaml must be a mapping of sections"),
    ("config-string", ["train", "--config", "{tmp}/string.yaml"], "string.yaml must be a mapping of sections"),
    ("section-int", ["train", "--config", "{tmp}/train5.yaml", "--train.output_dir", "{tmp}/o"],
     "section train: must be a mapping of keys (e.g. train: {key: value}), got 5 (int)"),
    ("sections-lists", ["train", "--config", "{tmp}/lists.yaml"],
     "invalid config (2 problems): section data: must be a mapping"),
    ("lr-inf", ["train", "--config", "{tmp}/inf.yaml"], "train.learning_rate=inf must be a finite number"),
    ("lr-nan", ["train", "--config", "{tmp}/nan.yaml"], "train.learning_rate='nan' must be a finite number"),
    ("lr-nan-cli", ["train", "--train.learning_rate", "nan"], "train.learning_rate='nan' must be a finite number"),
    ("all-problems", ["train", "--config", "{tmp}/many.yaml"],
     "invalid config (4 problems): train.max_steps='abc' must be an integer (e.g. 100); train.learning_rate=nan must "
     "be a finite number; data.template='{x:>9}': placeholder {x:>9} has a format spec"),
    ("template-spec", ["prepare", "--data.template", "{Tweet text:>99999999}"],
     "placeholder {Tweet text:>99999999} has a format spec or conversion; only plain {column} placeholders"),
    ("template-nested", ["prepare", "--data.template", "{Tweet text:{Label}}"],
     "placeholder {Tweet text:{Label}} has a format spec"),
    ("template-empty-field", ["prepare", "--data.template", "say {} now"], "empty placeholder {}"),
    ("template-dot-missing", ["prepare", "--data.template", "{review.text} :"],
     "data.template uses placeholder(s) ['review.text'] that"),
    ("temperature-nan", ["generate", "--model", "builtin:tiny-opt", "--temperature", "nan", "hi"],
     "--temperature: generate.temperature=nan must be a finite number"),
    ("csv-unclosed-quote", ["prepare", "--data.source", "{tmp}/unclosed.csv", "--data.template", "{text} :",
                            "--data.label_column", "label"],
     "unclosed.csv line 2: a quote ('\"') opened here is not closed properly"),
    ("csv-merged-rows", ["prepare", "--data.source", "{tmp}/merged.csv", "--data.template", "{text} :",
                         "--data.label_column", "label"],
     "merged.csv line 2: a quoted cell runs over lines 2-4 and holds lines that look like rows"),
    ("csv-bad-quote", ["prepare", "--data.source", "{tmp}/badquote.csv", "--data.template", "{text} :",
                       "--data.label_column", "label"], "badquote.csv line 2: a quote"),
    ("csv-duplicate-columns", ["prepare", "--data.source", "{tmp}/dupcols.csv", "--data.template", "{text} :",
                               "--data.label_column", "label"],
     "dupcols.csv: column name(s) ['text'] appear more than once in the header line"),
    ("jsonl-duplicate-keys", ["prepare", "--data.source", "{tmp}/dupkeys.jsonl", "--data.template", "{text} :",
                              "--data.label_column", "label"], "dupkeys.jsonl line 1: key 'text' appears twice"),
    ("empty-file", ["prepare", "--data.source", "{tmp}/empty.csv"], "empty.csv is empty (0 bytes)"),
    ("header-only", ["prepare", "--data.source", "{tmp}/header.csv"],
     "header.csv has a header line (text, label) but no rows"),
    ("labels-unk", ["prepare", "--data.source", "{tmp}/emoji.csv", "--data.template", "{text}：",
                    "--data.label_column", "label", "--model.name_or_path", "builtin:tiny-gpt2-zh"],
     "the model cannot tell the labels apart: labels ['😀', '😡'] all tokenize to ['[UNK]', '[SEP]']; label '😀' "
     "tokenizes to ['[UNK]', '[SEP]'], with the unknown token '[UNK]'"),
    ("labels-lowercased", ["prepare", "--data.source", "{tmp}/case.csv", "--data.template", "{text} :",
                           "--data.label_column", "label", "--model.name_or_path", "builtin:tiny-gpt2-zh"],
     "labels ['Good', 'good'] all tokenize to ['good', '[SEP]']"),
    ("vocab-mismatch", ["generate", "--model", "{tmp}/mixed", "你好"],
     "has 21128 entries but the model's embedding has 50265 rows: they are not the same vocabulary"),
    ("model-truncated", ["generate", "--model", "{tmp}/truncated", "hi"],
     "truncated/model.safetensors is corrupt or truncated (Error while deserializing header: incomplete metadata, "
     "file not fully covered, 100000 bytes); copy the model again"),
    ("remote-code", ["generate", "--model", "{tmp}/remote", "hi"],
     "ships its own model code (auto_map in its config), which clmtune does not run unless you allow it: set "
     "model.trust_remote_code: true"),
    ("remote-code-train", ["train", "--model.name_or_path", "{tmp}/remote", "--train.output_dir", "{tmp}/o"],
     "set model.trust_remote_code: true"),
]


def _model_folders(tmp: Path) -> None:
    """``mixed``: tiny-opt weights (BPE, 50,265 rows) with the BERT character tokenizer; ``truncated``: its weights
    file cut short; ``remote``: tiny-opt whose
    config asks for its own code (``auto_map``, an unknown ``model_type``)."""
    from clmtune.models import builtin_model_path

    opt, zh = builtin_model_path("tiny-opt"), builtin_model_path("tiny-gpt2-zh")
    shutil.copytree(opt, tmp / "mixed", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    for f in zh.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, tmp / "mixed" / f.name)
    shutil.copytree(opt, tmp / "truncated")
    with open(tmp / "truncated" / "model.safetensors", "r+b") as fh:
        fh.truncate(100_000)  # an interrupted copy
    shutil.copytree(opt, tmp / "remote")
    cfg = json.loads((tmp / "remote" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    cfg["model_type"] = "x-custom"  # an architecture transformers does not know: only the repository's code has it
    (tmp / "remote" / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cases")
    for name, text in FILES.items():
        (tmp / name).write_text(text, encoding="utf-8")
    _model_folders(tmp)
    return tmp


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line(args, expected, case_dir, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    rc = main([a.replace("{tmp}", str(case_dir)) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("clmtune: error:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


def test_dotted_column_is_a_column_and_nothing_is_evaluated(case_dir, capsys):
    rc = main(["prepare", "--data.source", str(case_dir / "dotted.csv"), "--data.template", "R: {review.text} {{x}}",
               "--data.label_column", "label", "--data.eval_fraction", "0", "--json"])
    assert rc == 0
    from clmtune.config import load_config
    from clmtune.data import load_task

    cfg = load_config(overrides={"data": {"source": str(case_dir / "dotted.csv"), "template": "R: {review.text} {{x}}",
                                          "label_column": "label", "eval_fraction": 0}})
    assert [e.prompt for e in load_task(cfg.data).train] == ["R: nice room {x}", "R: bad room {x}", "R: fine {x}",
                                                             "R: awful {x}", "R: ok {x}"]


def test_template_without_placeholder_warns(case_dir, caplog):
    from clmtune.config import load_config
    from clmtune.data import load_task

    cfg = load_config(overrides={"data": {"source": str(case_dir / "dotted.csv"), "template": "Review:",
                                          "label_column": "label"}})
    with caplog.at_level("WARNING", logger="clmtune"):
        load_task(cfg.data)
    assert "has no {column} placeholder: every prompt is the same text" in caplog.text


def test_csv_with_a_well_formed_multiline_cell_still_reads(tmp_path):
    from clmtune.data.sources import read_table

    p = tmp_path / "ok.csv"
    p.write_text('text,label\n"two lines,\nwith a comma",good\nnice,bad\n', encoding="utf-8")
    assert read_table(p) == [{"text": "two lines,\nwith a comma", "label": "good"}, {"text": "nice", "label": "bad"}]


# ---------------------------------------------------------------------------------------------------------------
# fsutil: atomic folders and files, the folder lock, disk-full and unwritable paths


def test_atomic_folder_failure_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(dest, replace=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json"]


def test_atomic_folder_replace_leaves_no_old_file(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("old")
    with atomic_folder(dest, replace=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(ClmtuneError, match="already exists and is not empty"):
        with atomic_folder(dest) as tmp:
            (tmp / "x").write_text("x")
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]


def test_killed_writer_leaves_only_a_temp_folder_that_is_cleaned(tmp_path):
    """A process killed (SIGKILL) inside atomic_folder: the destination never appears; its .tmp-* is removed later."""
    code = ("import os, sys, signal; from clmtune.fsutil import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as t:\n"
            "    open(os.path.join(t, 'part'), 'w').write('x'); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "dest")], env=env)
    assert proc.wait(timeout=60) == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [f".tmp-dest-{proc.pid}"]
    assert clean_stale_tmp(tmp_path) == [tmp_path / left[0]]
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_json_disk_full_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    atomic_write_json(path, {"accuracy": 0.5})
    real_open = open

    def full_disk_open(file, mode="r", *a, **kw):
        if "w" in mode and str(file).startswith(str(tmp_sibling(path))):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(ClmtuneError, match=r"no space left on the device while writing .*\.tmp-eval\.json-\d+ "
                                           r"\(about 0\.0 MB needed, [\d.]+ [MG]B free\)"):
        atomic_write_json(path, {"accuracy": 0.9})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_check_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ClmtuneError, match=r"output folder .*afile is a file; choose a folder path"):
        check_writable(tmp_path / "afile")
    with pytest.raises(ClmtuneError, match=r"output folder .*afile/run lies under a file"):
        check_writable(tmp_path / "afile" / "run")
    assert check_writable(tmp_path / "new" / "run").is_dir()
    if os.geteuid() != 0:  # root writes everywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ClmtuneError, match="cannot write"):
            check_writable(ro / "run")


def test_folder_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    with FolderLock(tmp_path, "clmtune train A") as lock:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "clmtune train A"
        with pytest.raises(ClmtuneError, match=rf"is in use by another clmtune process \(pid {os.getpid()} on .*"
                                               r"`clmtune train A` since .*\); wait for it to finish"):
            FolderLock(tmp_path, "clmtune train B").acquire()
        assert lock.held
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder["pid"] = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with FolderLock(tmp_path, "clmtune train C"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "clmtune train C"
    assert not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# Training faults: a diverging loss, a corrupt checkpoint


def _train_args(tmp_path, out, *extra):
    from tinyrun import twitter_rows

    return ["train", "--no-eval", "--data.source", str(twitter_rows(tmp_path)), "--data.eval_fraction", "0.25",
            "--data.labels", "[complaint, no complaint]", "--data.max_length", "48", "--model.name_or_path",
            "builtin:tiny-gpt2", "--train.output_dir", str(out), "--train.batch_size", "3", "--train.epochs", "2",
            *extra]


def test_diverging_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    rc = main(_train_args(tmp_path, out, "--train.learning_rate", "1e30", "--train.save_steps", "1",
                          "--train.max_grad_norm", "null"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("clmtune: error: training stopped at step 2: the loss is nan"), err
    assert f"the last good checkpoint is step 1 in {out / 'checkpoints'}" in err
    from clmtune.train import list_checkpoints

    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_skipped_on_resume(tmp_path, capsys, caplog, one_thread):
    """Straight run (6 steps) vs a copy of it killed after step 4 whose step-4 checkpoint is truncated: resume
    warns, starts from step 2, and ends with the same adapter."""
    from safetensors.torch import load_file

    common = ["--train.save_steps", "2", "--train.save_total_limit", "null", "--train.learning_rate", "1e-2"]
    assert main(_train_args(tmp_path, tmp_path / "straight", *common)) == 0
    out = tmp_path / "broken"
    shutil.copytree(tmp_path / "straight", out)
    shutil.rmtree(out / "adapter")  # as if killed right after the step-4 checkpoint
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")
    weights = out / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with caplog.at_level("WARNING", logger="clmtune"):
        assert main(_train_args(tmp_path, out, *common, "--resume")) == 0
    assert "skipping checkpoint" in caplog.text and "step-000004: adapter/adapter_model.safetensors is corrupt" \
        in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-000002'}" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# Run folders: finished marker, lock, atomic export and evaluation outputs, faults (kill, full disk)

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished LoRA run (tiny GPT-2, 4 steps, checkpoints every 2) and a finished LM run, both from the CLI."""
    from tinyrun import twitter_rows

    tmp = tmp_path_factory.mktemp("runs")
    data = twitter_rows(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for this module's runs (forked children inherit it); restored after the module
    common = ["--no-eval", "--data.source", str(data), "--data.eval_fraction", "0.25", "--data.max_length", "48",
              "--model.name_or_path", "builtin:tiny-gpt2", "--train.batch_size", "3", "--train.max_steps", "4",
              "--train.save_steps", "2"]
    assert main(["train", *common, "--data.labels", "[complaint, no complaint]", "--train.output_dir",
                 str(tmp / "run")]) == 0
    assert main(["train", *common, "--data.task", "lm", "--data.text_column", "Tweet text", "--train.output_dir",
                 str(tmp / "lm")]) == 0
    yield tmp
    torch.set_num_threads(threads)


def _copy_run(tiny_run, tmp_path, name="run") -> Path:
    dest = tmp_path / name
    shutil.copytree(tiny_run / name, dest)
    return dest


def _broken(kind: str, tiny_run: Path, tmp: Path) -> Path:
    run = _copy_run(tiny_run, tmp)
    if kind == "unfinished":
        (run / "train_summary.json").unlink()
    elif kind == "no-tokenizer":
        shutil.rmtree(run / "tokenizer")
    elif kind == "truncated":
        with open(run / "adapter" / "adapter_model.safetensors", "r+b") as fh:
            fh.truncate(1000)
    return run


RUN_CASES = [  # (id, how the folder is spoiled, arguments, expected line); {run} is the spoiled copy
    ("eval-not-a-run", "empty", ["eval", "--run", "{tmp}"], "is not a clmtune run folder (no config.yaml)"),
    ("eval-unfinished", "unfinished", ["eval", "--run", "{run}"],
     "/run: its weights are saved but training did not finish writing (killed while saving?); `clmtune train "
     "--config"),
    ("eval-no-tokenizer", "no-tokenizer", ["eval", "--run", "{run}"], "has no tokenizer/ folder"),
    ("generate-truncated-adapter", "truncated", ["generate", "--run", "{run}", "hi"],
     "adapter/adapter_model.safetensors is corrupt or truncated"),
    ("generate-model-unfinished-run", "unfinished", ["generate", "--model", "{run}", "hi"],
     "cannot load {run}: its weights are saved but training did not finish writing"),
    ("export-unfinished", "unfinished", ["export", "--run", "{run}", "--to", "{tmp}/out"], "cannot export"),
    ("export-to-file", "none", ["export", "--run", "{run}", "--to", "{tmp}/afile"],
     "--to {tmp}/afile is a file; give a folder path"),
    ("export-under-file", "none", ["export", "--run", "{run}", "--to", "{tmp}/afile/out"],
     "the folder of --to {tmp}/afile is a file; choose a folder path"),
    ("train-output-is-file", "none", ["train", "--train.output_dir", "{tmp}/afile", "--train.max_steps", "1"],
     "output folder {tmp}/afile is a file; choose a folder path"),
    ("train-output-under-file", "none", ["train", "--train.output_dir", "{tmp}/afile/run"],
     "output folder {tmp}/afile/run lies under a file ({tmp}/afile)"),
    ("train-unfinished-without-resume", "unfinished", ["train", "--config", "{run}/config.yaml", "--train.output_dir", "{run}"],
     "holds checkpoints of an unfinished run; continue it with --resume"),
    ("lm-method-generate", "lm", ["eval", "--run", "{run}", "--method", "generate"],
     "--method generate: a lm run is scored by perplexity"),
]


@pytest.mark.parametrize("spoil, args, expected", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_folder_error_is_one_line(spoil, args, expected, tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path, "lm") if spoil == "lm" else (
        tmp_path if spoil == "empty" else _broken(spoil, tiny_run, tmp_path))
    (tmp_path / "afile").write_text("x")
    fill = lambda a: a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path))  # noqa: E731
    rc = main([fill(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("clmtune: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fill(expected) in lines[0], lines[0]


@pytest.mark.slow
def test_resume_finishes_a_run_killed_before_its_summary(tiny_run, tmp_path, capsys):
    run = _broken("unfinished", tiny_run, tmp_path)
    shutil.rmtree(run / "checkpoints")  # no checkpoint: only the saved weights are left to finish from
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--config", str(run / "config.yaml"), "--train.output_dir", str(run), "--resume", "--no-eval"]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == json.loads(
        (run / "train_log.jsonl").read_text().splitlines()[-1])["loss"]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0 and (run / "eval.json").is_file()


@pytest.mark.slow
def test_overwrite_clears_old_eval_files_and_lock_is_released(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    assert main(["eval", "--run", str(run)]) == 0
    assert (run / "eval.json").is_file()
    assert {"eval.json", "predictions.csv", "confusion_matrix.png"} <= {p.name for p in (run / "eval" / "eval-rank").iterdir()}
    assert main(["train", "--config", str(run / "config.yaml"), "--train.output_dir", str(run), "--overwrite", "--no-eval"]) == 0
    names = {p.name for p in run.iterdir()}
    assert not names & {"eval.json", "eval", "predictions.csv", "confusion_matrix.png", LOCK_NAME}, names
    assert not [n for n in names if n.startswith(".tmp-")]


@pytest.mark.slow
def test_export_overwrite_replaces_the_folder_and_a_to_file_is_refused(tiny_run, tmp_path):
    run, out = _copy_run(tiny_run, tmp_path), tmp_path / "export"
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    assert (out / "adapter_config.json").is_file()
    assert main(["export", "--run", str(run), "--to", str(out), "--merge", "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" not in names and "model.safetensors" in names, names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]


def _in_child(patch, args: list[str]) -> int:
    """Run ``clmtune ARGS`` in a forked child process (everything is imported already, so it starts in
    milliseconds) after ``patch()``; return its exit status, or -N when a signal N ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            signal.alarm(240)  # a hung child ends (SIGALRM) instead of hanging the suite
            patch()
            code = main(args)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _kill_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_tokenizer_save():
    import transformers.tokenization_utils_base as t

    t.PreTrainedTokenizerBase.save_pretrained = _kill_self


@pytest.mark.slow
def test_export_killed_midway_leaves_the_old_export(tiny_run, tmp_path):
    run, out = _copy_run(tiny_run, tmp_path), tmp_path / "export"
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    old = sorted(p.name for p in out.iterdir())
    # killed after the merged weights were written, before the tokenizer
    rc = _in_child(_kill_at_tokenizer_save, ["export", "--run", str(run), "--to", str(out), "--merge", "--overwrite"])
    assert rc == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == old  # the earlier export, untouched
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and left[0].startswith(".tmp-export-")
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "export2")]) == 0
    assert main(["export", "--run", str(run), "--to", str(out), "--merge", "--overwrite"]) == 0  # cleans it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_eval_killed_before_its_metrics_leaves_no_stale_pair(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    assert main(["eval", "--run", str(run)]) == 0
    import clmtune.evaluate.report as report

    def kill_before_metrics():
        report.write_json_atomic = _kill_self

    assert _in_child(kill_before_metrics, ["eval", "--run", str(run)]) == -signal.SIGKILL
    folder = run / "eval" / "eval-rank"
    assert not (folder / "eval.json").exists()  # no old metrics next to the new predictions
    rows = (folder / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "id,text,gold,predicted" and len(rows) == 1 + 3  # complete, not 0 bytes
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    import clmtune.train.checkpoints as ck

    run = _copy_run(tiny_run, tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step-000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    rc = main(["train", "--config", str(run / "config.yaml"), "--train.output_dir", str(run), "--overwrite", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "no space left on the device while writing" in err and "optimizer.pt (about" in err and "free)" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert not (run / "adapter").exists() and not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_trainers_into_one_folder(tiny_run, tmp_path, capsys):
    """The second `clmtune train` into a folder another process is writing is refused; the first finishes alone.
    The first (a child process) waits after taking the lock, before its optimizer steps, until the second (this
    process) has been refused."""
    import clmtune.train as train_mod

    run, go = _copy_run(tiny_run, tmp_path), tmp_path / "go"
    args = ["train", "--config", str(run / "config.yaml"), "--train.output_dir", str(run), "--overwrite", "--no-eval"]

    def wait_for_go():
        fit = train_mod.TrainRecipe.fit

        def waiting(self):
            while not go.exists():
                time.sleep(0.05)
            return fit(self)

        train_mod.TrainRecipe.fit = waiting

    first = os.fork()
    if first == 0:
        code = 3
        try:
            wait_for_go()
            code = main([*args, "--train.seed", "1"])
        finally:
            os._exit(code)
    try:
        for _ in range(1200):
            if (run / LOCK_NAME).exists():
                break
            time.sleep(0.05)
        assert main([*args, "--train.seed", "2"]) == 2  # the second writer: this process
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"is in use by another clmtune process (pid {first}" in err, err
        go.write_text("")
        _, status = os.waitpid(first, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        go.write_text("")
    cfg = (run / "config.yaml").read_text()
    assert "seed: 1" in cfg and "seed: 2" not in cfg
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4
    assert not (run / LOCK_NAME).exists()


def test_eval_data_is_read_with_the_runs_encoding_and_delimiter(tiny_run, tmp_path, capsys):
    """A run trained on GBK, ';'-separated files: `eval --data` reads another such file the same way."""
    import yaml

    run = _copy_run(tiny_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"].update(encoding="gbk", delimiter=";")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    data = tmp_path / "new.csv"
    data.write_bytes("Tweet text;Label\n房间太脏了;complaint\n服务很好;no complaint\n".encode("gbk"))
    assert main(["eval", "--run", str(run), "--data", str(data)]) == 0
    rows = (run / "eval" / "file-new-rank" / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert rows[1].split(",")[1:3] == ["房间太脏了", "complaint"] and len(rows) == 3


def test_unwritable_output_folder_is_one_line(tmp_path, monkeypatch):
    def refused(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refused)  # as root nothing is read-only: refuse the probe write
    with pytest.raises(ClmtuneError, match=r"cannot write .*\.tmp-probe-\d+: Permission denied; choose a folder"):
        check_writable(tmp_path / "run")
