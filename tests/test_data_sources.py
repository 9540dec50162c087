"""Issue 3, reading and splitting: every source kind, empty/duplicate rows, label mapping, the tutorial's split,
and one-line errors for bad input. Real files from ../shared/data (and the copies shipped in assets/)."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from clmtune.config import DataConfig
from clmtune.data import assets_path, load_task, read_table
from clmtune.errors import ClmtuneError

TWEETS = "Tweet text : {Tweet text} label : "


def _tweets():
    return read_table(assets_path("raft/twitter_complaints/train.csv"))


def _write_csv(path, rows, fields, delimiter=","):
    # TSV as GLUE/CLUE write it: no quoting (so no tabs or newlines inside a field)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    if quoting == csv.QUOTE_NONE:
        assert not any("\t" in str(v) or "\n" in str(v) for r in rows for v in r.values())
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, delimiter=delimiter, quoting=quoting, quotechar=None if
                           quoting == csv.QUOTE_NONE else '"')
        w.writeheader()
        w.writerows(rows)
    return path


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_every_file_format_gives_the_same_examples(tmp_path):
    import pandas as pd

    rows = _tweets()
    fields = ["Tweet text", "Label", "ID"]
    files = [_write_csv(tmp_path / "t.csv", rows, fields), _write_csv(tmp_path / "t.tsv", rows, fields, "\t")]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    files += [tmp_path / "t.jsonl", tmp_path / "t.json", tmp_path / "t.parquet"]
    reference = load_task(DataConfig(source="builtin:raft/twitter_complaints", test_file=None))
    for f in files:
        task = load_task(DataConfig(source=str(f), labels=["complaint", "no complaint"]))
        assert [(e.id, e.prompt, e.label) for e in task.train] == [(e.id, e.prompt, e.label) for e in reference.train]
        assert [(e.id, e.prompt, e.label) for e in task.eval] == [(e.id, e.prompt, e.label) for e in reference.eval]
        assert task.test == []


def test_folder_with_its_own_splits_and_integer_labels(shared_data):
    # ChnSentiCorp train/dev/test.tsv: label 0/1 -> 差评/好评 through data.labels; dev is the eval split, test is
    # labelled, so the file splits are used as they are (no eval_fraction split).
    cfg = DataConfig(source=str(shared_data / "chnsenticorp"), template="{text_a}。评价：", label_column="label",
                     labels=["差评", "好评"])
    task = load_task(cfg)
    r = task.report
    assert r["read"] == {"train": 9600, "eval": 1200, "test": 1200}
    assert r["eval_from"].endswith("dev.tsv")
    assert (r["train"], r["eval"], r["test"]) == (9600 - r["dropped_empty"]["train"], 1200 - r["dropped_empty"]["eval"],
                                                  1200 - r["dropped_empty"]["test"])
    rows = read_table(shared_data / "chnsenticorp" / "train.tsv")
    assert rows[0]["label"] == "1" and task.train[0].label == "好评" and task.train[0].prompt.startswith("选择珠江花园")
    want = Counter("好评" if x["label"] == "1" else "差评" for x in rows if x["text_a"].strip())
    assert r["label_counts"]["train"] == dict(want)
    assert all(e.label in ("好评", "差评") for e in task.test)


def test_txt_folder_one_example_per_line_empty_lines_counted(tmp_path, shared_data):
    lines = (shared_data / "corpora" / "CLUECorpusSmall_sampled.txt").read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(lines[:30]) + "\n\n\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("\n".join(lines[30:50]), encoding="utf-8")
    task = load_task(DataConfig(source=str(folder), task="lm", eval_fraction=0))
    non_empty = [x for x in lines[:50] if x.strip()]
    assert [e.text for e in task.train] == non_empty
    assert task.report["dropped_empty"]["train"] == 50 - len(non_empty) + 2  # + the two blank lines at a.txt's end
    doc = load_task(DataConfig(source=str(folder), task="lm", eval_fraction=0, text_sample_by="document"))
    assert len(doc.train) == 2


def test_hf_dataset_id_without_network_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ClmtuneError) as exc:
        load_task(DataConfig(source="hf:seamew/ChnSentiCorp", label_column="label", template="{text}"))
    msg = _one_line_error(exc)
    assert "hf:seamew/ChnSentiCorp" in msg and "network" in msg and "local" in msg


def test_empty_rows_dropped_and_counted_duplicates_kept_unless_dedup(tmp_path):
    rows = [{"label": "1", "review": "很好"}, {"label": "0", "review": ""}, {"label": "1", "review": "很好"},
            {"label": "0", "review": "  "}, {"label": "0", "review": "太差"}, {"label": "1", "review": "不错"}]
    f = _write_csv(tmp_path / "r.csv", rows, ["label", "review"])
    cfg = DataConfig(source=str(f), template="{review}", label_column="label", labels=["差评", "好评"], eval_fraction=0)
    task = load_task(cfg)
    assert [e.prompt for e in task.train] == ["很好", "很好", "太差", "不错"]
    assert task.report["dropped_empty"]["train"] == 2 and task.report["dropped_duplicate"]["train"] == 0
    cfg.dedup = True
    task = load_task(cfg)
    assert [e.prompt for e in task.train] == ["很好", "太差", "不错"]
    assert task.report["dropped_duplicate"]["train"] == 1


def test_split_is_the_tutorials_filter_then_train_test_split(shared_data):
    import datasets

    path = shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv"
    ds = datasets.load_dataset("csv", data_files=str(path), split="train", keep_in_memory=True)
    ds = ds.filter(lambda x: x["review"] is not None).train_test_split(0.2, seed=123)
    task = load_task(DataConfig(source=str(path), template="{review}", label_column="label", labels=["差评", "好评"]))
    assert [e.prompt for e in task.train] == ds["train"]["review"]
    assert [e.prompt for e in task.eval] == ds["test"]["review"]
    assert [e.label for e in task.eval] == [["差评", "好评"][y] for y in ds["test"]["label"]]
    assert task.report["dropped_empty"]["train"] == 1


def test_stratified_split_keeps_label_proportions(shared_data):
    cfg = DataConfig(source=str(shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv"), template="{review}",
                     label_column="label", labels=["差评", "好评"], stratify=True)
    task = load_task(cfg)
    counts = task.report["label_counts"]
    total = {k: counts["train"][k] + counts["eval"][k] for k in counts["train"]}
    for label, n in total.items():
        assert abs(counts["eval"][label] - 0.2 * n) <= 1
    assert task.report["eval_from"].endswith("stratified")


def test_builtin_banking_77_has_77_labels_from_task_json():
    task = load_task(DataConfig(source="builtin:raft/banking_77", template="Query : {Query} label : "))
    assert len(task.labels) == 77 and "card payment wrong exchange rate" in task.labels
    assert len(task.test) == 5000 and all(e.label is None for e in task.test)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the value and the fix


def test_wrong_delimiter_names_file_and_delimiter(tmp_path):
    f = _write_csv(tmp_path / "tabs.csv", _tweets(), ["Tweet text", "Label", "ID"], "\t")
    with pytest.raises(ClmtuneError) as exc:
        load_task(DataConfig(source=str(f)))
    msg = _one_line_error(exc)
    assert "tabs.csv" in msg and "line 1" in msg and "data.delimiter: '\\t'" in msg
    task = load_task(DataConfig(source=str(f), delimiter="\t", labels=["complaint", "no complaint"]))
    assert len(task.train) == 40


def test_wrong_encoding_names_file_and_line(tmp_path):
    f = tmp_path / "gbk.csv"
    f.write_bytes("label,review\n1,good\n0,房间很小\n".encode("gbk"))
    cfg = DataConfig(source=str(f), template="{review}", label_column="label", labels=["差评", "好评"], eval_fraction=0)
    with pytest.raises(ClmtuneError) as exc:
        load_task(cfg)
    msg = _one_line_error(exc)
    assert "gbk.csv" in msg and "line 3" in msg and "data.encoding" in msg
    cfg.encoding = "gbk"
    assert [e.prompt for e in load_task(cfg).train] == ["good", "房间很小"]


def test_template_placeholder_that_is_no_column():
    with pytest.raises(ClmtuneError) as exc:
        load_task(DataConfig(template="Text : {tweet} label : "))
    msg = _one_line_error(exc)
    assert "'tweet'" in msg and "data.template" in msg and "Tweet text" in msg


def test_json_file_with_mixed_keys(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"txt": "c", "label": "x"}\n',
                 encoding="utf-8")
    with pytest.raises(ClmtuneError) as exc:
        load_task(DataConfig(source=str(f), template="{text}", label_column="label"))
    msg = _one_line_error(exc)
    assert "mixed.jsonl line 3" in msg and "'txt'" in msg and "same keys" in msg


def test_label_outside_the_label_list(tmp_path):
    f = _write_csv(tmp_path / "r.csv", [{"label": "1", "review": "好"}, {"label": "2", "review": "坏"}],
                   ["label", "review"])
    with pytest.raises(ClmtuneError) as exc:
        load_task(DataConfig(source=str(f), template="{review}", label_column="label", labels=["差评", "好评"]))
    msg = _one_line_error(exc)
    assert "r.csv line 3" in msg and "label '2'" in msg and "data.labels" in msg


def test_split_that_ends_up_empty(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    _write_csv(folder / "train.csv", [{"label": "1", "review": "好"}] * 3, ["label", "review"])
    _write_csv(folder / "dev.csv", [{"label": "1", "review": ""}] * 2, ["label", "review"])
    cfg = DataConfig(source=str(folder), template="{review}", label_column="label", labels=["差评", "好评"])
    with pytest.raises(ClmtuneError) as exc:
        load_task(cfg)
    msg = _one_line_error(exc)
    assert "eval split" in msg and "dev.csv" in msg and "2 rows" in msg
    (folder / "dev.csv").unlink()
    _write_csv(folder / "train.csv", [{"label": "1", "review": "好"}], ["label", "review"])
    with pytest.raises(ClmtuneError) as exc:
        load_task(cfg)
    assert "data.eval_fraction=0.2" in _one_line_error(exc)


def test_shipped_chnsenticorp_is_the_shared_file(shared_data):
    shipped = assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv")
    assert shipped.read_bytes() == (shared_data / "chnsenticorp" / "ChnSentiCorp_htl_all.csv").read_bytes()
    assert (shipped.parent / "DATA_CARD.md").is_file()
    # the data card's counts are the file's
    rows = read_table(shipped)
    assert len(rows) == 7766 and Counter(r["label"] for r in rows) == {"1": 5322, "0": 2444}


def test_hf_dataset_splits_and_classlabel_names(monkeypatch):
    """What load_dataset returns (a DatasetDict with a ClassLabel column) becomes our splits and label words."""
    import datasets

    rows = read_table(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"))[:40]
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})

    def fake_load_dataset(name, subset=None):
        assert (name, subset) == ("someone/hotel_reviews", "htl")
        part = {"text": [r["review"] for r in rows], "label": [int(r["label"]) for r in rows]}
        ds = datasets.Dataset.from_dict(part, features=feats)
        return datasets.DatasetDict({"train": ds.select(range(30)), "validation": ds.select(range(30, 40))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task(DataConfig(source="hf:someone/hotel_reviews:htl", template="{text}", label_column="label"))
    assert task.labels == ["negative", "positive"]
    assert len(task.train) == 30 and len(task.eval) == 10 and task.report["eval_from"].endswith("[validation]")
    assert [e.label for e in task.eval] == [["negative", "positive"][int(r["label"])] for r in rows[30:]]


def test_eval_file_replaces_the_fraction_split(tmp_path):
    rows = _tweets()
    dev = _write_csv(tmp_path / "dev.csv", rows[:7], ["Tweet text", "Label", "ID"])
    task = load_task(DataConfig(eval_file=str(dev)))
    assert len(task.train) == 50 and [e.id for e in task.eval] == [r["ID"] for r in rows[:7]]
    assert task.report["eval_from"] == str(dev)
