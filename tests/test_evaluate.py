"""Evaluate stage on a trained tiny run: metrics agree with the predictions file; RAFT submission shape."""

from __future__ import annotations

import csv
import json

from clmtune.evaluate import classification_metrics, evaluate_run


def test_accuracy_matches_a_hand_count_of_the_predictions_file(trained, tmp_path):
    cfg, result = trained
    for method in ("rank", "generate"):
        metrics, where = evaluate_run(result.output_dir, data_file=cfg.data.source, method=method,
                                      out_dir=tmp_path / method, progress=False)
        rows = list(csv.DictReader(open(where / "predictions.csv", encoding="utf-8")))
        assert len(rows) == metrics["n"] == 8
        assert metrics["accuracy"] == sum(r["gold"] == r["predicted"] for r in rows) / len(rows)
        assert metrics["invalid"] == sum(r["predicted"] not in ("complaint", "no complaint") for r in rows)
        assert json.loads((where / "eval.json").read_text())["accuracy"] == metrics["accuracy"]
        assert metrics["method"] == method
    assert metrics["invalid"] >= 0


def test_the_overfit_run_ranks_its_own_training_rows_better_than_chance(trained, tmp_path):
    cfg, result = trained
    metrics, _ = evaluate_run(result.output_dir, data_file=cfg.data.source, out_dir=tmp_path, progress=False)
    # 8 rows, 3 of them complaints: always answering the majority class gives 5/8.
    assert metrics["accuracy"] > 5 / 8


def test_unlabelled_split_writes_a_raft_submission(trained, tmp_path):
    cfg, result = trained
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text("Tweet text,ID\n@united lost my bag,50\nlove this airline,51\n", encoding="utf-8")
    metrics, where = evaluate_run(result.output_dir, data_file=str(unlabelled), out_dir=tmp_path / "sub",
                                  progress=False)
    rows = list(csv.reader(open(where / "predictions.csv", encoding="utf-8")))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["50", "51"]
    assert all(r[1] in ("complaint", "no complaint") for r in rows[1:])
    assert "accuracy" not in metrics and metrics["n"] == 2


def test_macro_f1_is_over_the_label_set():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "a", "a", "junk"], ["a", "b"])
    assert m["accuracy"] == 0.5
    # class a: P=2/3 R=1 F1=0.8; class b: F1=0 -> macro 0.4 (the invalid "junk" adds no class)
    assert abs(m["macro_f1"] - 0.4) < 1e-9
    assert m["confusion_matrix"]["rows_gold_cols_predicted"] == [[2, 0], [1, 0]]
