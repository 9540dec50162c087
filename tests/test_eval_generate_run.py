"""Evaluate and generate on a trained run folder, its merged export, and a base model folder (through the CLI)."""

from __future__ import annotations

import csv
import json

import pytest

from clmtune import cli
from clmtune.config import from_dict
from clmtune.data import assets_path
from clmtune.models import builtin_model_path
from clmtune.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "twitter"
    cfg = from_dict({"train": {"output_dir": str(out), "max_steps": 6, "batch_size": 8}}).validate()
    train(cfg, progress=False)
    return out


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_rank_and_generate_eval_files(run_dir, tmp_path, capsys):
    for method in ("rank", "generate"):
        out = tmp_path / method
        assert cli.main(["eval", "--run", str(run_dir), "--method", method, "--out", str(out)]) == 0
        res = json.loads((out / "eval.json").read_text(encoding="utf-8"))
        rows = _read_csv(out / "predictions.csv")
        labels = res["confusion_matrix"]["labels"]
        assert res["method"] == method and res["n"] == len(rows) == 10
        assert res["examples_per_s"] > 0 and res["seconds"] > 0
        assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
        cm = res["confusion_matrix"]["rows_gold_cols_predicted"]
        assert sum(map(sum, cm)) + sum(res["confusion_matrix"]["invalid_per_gold"]) == res["n"]
        correct = sum(r["gold"] == r["predicted"] for r in rows)
        assert res["accuracy"] == pytest.approx(correct / len(rows))
        if method == "rank":
            assert res["invalid"] == 0 and all(r["predicted"] in labels for r in rows)
        else:
            assert res["invalid"] == sum(r["output"] not in labels for r in rows)
            assert all(r["mapped"] in labels for r in rows)
            assert all(r["mapped"] == r["output"] for r in rows if r["output"] in labels)
            mapped = res["mapped_to_nearest_label"]
            assert mapped["accuracy"] == pytest.approx(sum(r["gold"] == r["mapped"] for r in rows) / len(rows))
            assert mapped["accuracy"] >= res["accuracy"]
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_unlabelled_file_gives_a_raft_submission(run_dir, tmp_path):
    src = assets_path("raft/twitter_complaints/test_unlabeled.csv")
    rows = _read_csv(src)[:12]
    small = tmp_path / "test_small.csv"
    with open(small, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "sub"
    assert cli.main(["eval", "--run", str(run_dir), "--data", str(small), "--out", str(out)]) == 0
    sub = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert sub[0] == "ID,Label"
    assert [line.split(",")[0] for line in sub[1:]] == [r["ID"] for r in rows]
    assert {line.split(",", 1)[1] for line in sub[1:]} <= {"complaint", "no complaint"}
    res = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert res["submission"] and sum(res["predicted_counts"].values()) == 12


@pytest.mark.slow
def test_labels_outside_the_run_label_set_are_an_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Tweet text,Label,ID\nhello,complaint,1\nworld,praise,2\n", encoding="utf-8")
    assert cli.main(["eval", "--run", str(run_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "label 'praise' is not in the label set" in err


@pytest.mark.slow
def test_generate_from_run_run_as_model_and_merged_export_agree(run_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli.main(["export", "--run", str(run_dir), "--to", str(merged), "--merge"]) == 0
    prompt = "Tweet text : @united my flight was cancelled label : "
    outputs = []
    for src in (["--run", str(run_dir)], ["--model", str(run_dir)], ["--model", str(merged)]):
        capsys.readouterr()
        assert cli.main(["generate", *src, prompt, "--temperature", "0", "--max-new-tokens", "6", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"])
    assert outputs[0] == outputs[1] == outputs[2]
    # the base model (no adapter) is a different model
    assert cli.main(["generate", "--model", str(builtin_model_path("tiny-opt")), prompt, "--temperature", "0",
                     "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"] != outputs[0]
