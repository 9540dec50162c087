"""CLI: bad input ends with one line naming the value and the fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clmtune.cli import main


def _csv(tmp_path, text):
    p = tmp_path / "d.csv"
    p.write_text(text, encoding="utf-8")
    return str(p)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,needle", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--data.source", "missing.csv"], "data.source='missing.csv': no such file"),
    (["--data.template", "{tweet} label : "], "uses placeholder(s) ['tweet']"),
    (["--data.labels", "[complaint, praise]"], "is not in the label set"),
    (["--data.max_length", "2"], "data.max_length=2 cannot hold the label"),
    (["--train.epochs", "0", "--generate.top_p", "2"], "2 problems"),
    (["--train.nope", "1"], "unknown key train.nope"),
    (["--model.name_or_path", "./no/such/model"], "no such folder"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    code, out, err = run(capsys, "train", "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2
    assert needle in err
    # progress bars may come before it; the error itself is one line, the last one
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("clmtune: error")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err


def test_empty_dataset_after_filtering(tmp_path, capsys):
    src = _csv(tmp_path, "Tweet text,Label\n,complaint\n  ,no complaint\n")
    code, _, err = run(capsys, "train", "--output-dir", str(tmp_path / "o"), "--data.source", src)
    assert code == 2 and "no training rows left" in err and "2 with empty text" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--debug", "train", "--output-dir", str(tmp_path), "--data.source", "missing.csv")
    assert code == 2 and "Traceback" in err and "missing.csv" in err


def test_module_entry_point_and_help():
    res = subprocess.run([sys.executable, "-m", "clmtune", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and all(c in res.stdout for c in ("train", "eval", "generate", "export"))


def test_generate_from_a_run_prints_continuations(trained, capsys):
    _, result = trained
    code, out, _ = run(capsys, "generate", "--run", str(result.output_dir), "--max-new-tokens", "4",
                       "--num-return-sequences", "2", "--json", "Tweet text : where is my parcel label : ")
    assert code == 0
    import json

    record = json.loads(out.strip().splitlines()[-1])
    assert record["prompt"].startswith("Tweet text") and len(record["outputs"]) == 2
    code, _, err = run(capsys, "generate", "--run", str(result.output_dir), "--top-p", "1.5", "hi")
    assert code == 2 and "generate.top_p=1.5" in err
