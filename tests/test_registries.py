"""The extension points: a data format is one reader plus a registration, a metric one function plus a
registration; both are then used by the normal paths (loading a run's data, evaluating, reporting)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clmtune.config import DataConfig
from clmtune.data import load_task
from clmtune.data.readers import READERS, Reader, ReadOptions, read_table, register_reader
from clmtune.errors import ClmtuneError

RECORDS = """text: my flight was cancelled again
Label: complaint

text: thanks for the quick help
Label: no complaint

text: still no refund after a month
Label: complaint

text: great service today
Label: no complaint
"""


def read_rec(path: Path, options: ReadOptions) -> list[dict]:
    """A toy format: records of ``key: value`` lines separated by blank lines."""
    rows = []
    for block in path.read_text(encoding=options.encoding).split("\n\n"):
        if block.strip():
            rows.append(dict(line.split(": ", 1) for line in block.strip().splitlines()))
    return rows


@pytest.fixture
def rec_format():
    reader = register_reader(Reader("rec", (".rec",), read_rec))
    yield reader
    READERS.pop("rec")


def test_a_new_data_format_is_one_reader_and_a_registration(rec_format, tmp_path):
    path = tmp_path / "tweets.rec"
    path.write_text(RECORDS, encoding="utf-8")
    task = load_task(DataConfig(source=str(path), eval_fraction=0.0, labels=["complaint", "no complaint"],
                                template="Text : {text} Label : "))
    assert task.train[0].prompt == "Text : my flight was cancelled again Label : "
    assert [(e.text, e.label) for e in task.train] == [
        ("my flight was cancelled again", "complaint"), ("thanks for the quick help", "no complaint"),
        ("still no refund after a month", "complaint"), ("great service today", "no complaint")]
    # a folder of split files finds train.rec / dev.rec through the same registry
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.rec").write_text(RECORDS, encoding="utf-8")
    (folder / "dev.rec").write_text(RECORDS.split("\n\n")[0] + "\n", encoding="utf-8")
    task = load_task(DataConfig(source=str(folder), labels=["complaint", "no complaint"], template="{text} : "))
    assert len(task.train) == 4 and [e.label for e in task.eval] == ["complaint"]
    assert task.report["sources"]["eval"].endswith("dev.rec")


def test_an_unknown_suffix_names_the_value_and_every_known_one(rec_format, tmp_path):
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>", encoding="utf-8")
    with pytest.raises(ClmtuneError) as info:
        read_table(path)
    msg = str(info.value)
    assert "\n" not in msg and "'.xml'" in msg and ".csv" in msg and ".parquet" in msg and ".rec" in msg


def test_encoding_errors_are_one_line_naming_the_line_and_the_fix(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes("text,label\nok,a\n".encode() + "差评,b\n".encode("gbk"))
    with pytest.raises(ClmtuneError) as info:
        read_table(path)
    msg = str(info.value)
    assert "\n" not in msg and "line 3" in msg and "data.encoding" in msg and "iconv" in msg
    assert read_table(path, ReadOptions(encoding="gbk"))[1] == {"text": "差评", "label": "b"}


def test_prompts_files_are_read_by_the_registered_readers(rec_format, tmp_path):
    from clmtune.generate import read_prompts_file

    path = tmp_path / "prompts.rec"
    path.write_text(RECORDS, encoding="utf-8")
    assert read_prompts_file(path, "text")[:2] == ["my flight was cancelled again", "thanks for the quick help"]
    with pytest.raises(ClmtuneError, match="is a table; name the prompt column with --column"):
        read_prompts_file(path)
    gbk = tmp_path / "prompts.txt"
    gbk.write_bytes("你好\n".encode("gbk"))
    with pytest.raises(ClmtuneError) as info:
        read_prompts_file(gbk)
    assert "line 1" in str(info.value) and "data.encoding" not in str(info.value)  # no such setting for prompts


def test_a_new_conversation_shape_is_one_function_and_a_registration():
    from clmtune.tasks.conversations import (CONVERSATION_FORMATS, ConversationFormat, detect_format,
                                             register_conversation_format, to_conversations)

    def from_qa(rec, cols):
        return [{"role": "user", "content": rec["input"]}, {"role": "assistant", "content": rec["output"]}]

    from clmtune.config import DataConfig
    from clmtune.config.task_rules import CHAT_FORMATS, TASK_RULES

    register_conversation_format(ConversationFormat("qa", ("input", "output"), from_qa, "question/answer"))
    try:
        rows = [{"input": "你好", "output": "你好！"}]
        assert detect_format(rows) == "qa"
        # the configuration, below the registry, accepts the new name as data.format
        assert not TASK_RULES["chat"].data_problems(DataConfig(task="chat", format="qa"))
        assert to_conversations(rows).conversations == [[{"role": "user", "content": "你好"},
                                                         {"role": "assistant", "content": "你好！"}]]
    finally:
        CONVERSATION_FORMATS.pop("qa")
        CHAT_FORMATS.remove("qa")
    with pytest.raises(ClmtuneError, match="cannot tell the conversation format"):
        detect_format([{"input": "a", "output": "b"}])


@pytest.fixture
def share_of_first_label():
    from clmtune.metrics import METRICS, label_metric

    @label_metric("first_label_share", "share predicted as the first label")
    def first_label_share(gold, predicted, labels):
        return sum(p == labels[0] for p in predicted) / len(predicted)

    yield first_label_share
    METRICS.pop("first_label_share")


def test_a_new_metric_is_one_function_and_a_registration(trained, share_of_first_label, tmp_path):
    import csv

    from clmtune.evaluate import evaluate_run
    from clmtune.report import evaluation_lines, write_report

    run = shutil.copytree(trained[1].output_dir, tmp_path / "run")
    metrics, where = evaluate_run(run, data_file=trained[0].data.source, out_dir=Path(run) / "eval" / "toy",
                                  progress=False)
    with open(where / "predictions.csv", encoding="utf-8") as fh:
        predicted = [r["predicted"] for r in csv.DictReader(fh)]
    expected = sum(p == "complaint" for p in predicted) / len(predicted)
    assert json.loads((where / "eval.json").read_text(encoding="utf-8"))["first_label_share"] == expected
    index = json.loads((Path(run) / "eval" / "index.json").read_text(encoding="utf-8"))
    assert index["eval/toy"]["first_label_share"] == expected
    page = write_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    assert f"<th>share predicted as the first label</th><td class=\"num\">{expected:.4f}</td>" in page
    assert any(f"share predicted as the first label {expected:.4f}" in line for line in evaluation_lines([run]))


def count_reads(monkeypatch, name: str) -> list[Path]:
    """Every file the registered reader ``name`` reads, in order."""
    import dataclasses

    reader, reads = READERS[name], []
    monkeypatch.setitem(READERS, name, dataclasses.replace(
        reader, read=lambda path, o: reads.append(Path(path)) or reader.read(path, o)))
    return reads


def test_evaluating_a_run_reads_its_data_once_or_not_at_all_when_handed_down(trained, monkeypatch, tmp_path):
    import dataclasses

    from clmtune.evaluate import evaluate_run
    from clmtune.tasks import get_task

    cfg, result = trained
    run = shutil.copytree(result.output_dir, tmp_path / "run")
    reads = count_reads(monkeypatch, "csv")
    metrics, _ = evaluate_run(run, data_file=cfg.data.source, out_dir=tmp_path / "a", progress=False)
    assert reads == [Path(cfg.data.source)] and metrics["n"] == 8
    # the entry point resolved the task and read the examples: evaluation reads nothing, looks nothing up
    data = load_task(cfg.data)
    data = dataclasses.replace(data, eval=data.train)
    reads.clear()
    monkeypatch.setattr("clmtune.evaluate.run.get_task", lambda name: pytest.fail("task looked up again"))
    again, _ = evaluate_run(run, out_dir=tmp_path / "b", progress=False, data=data)
    assert reads == [] and again["n"] == 8 and again["accuracy"] == metrics["accuracy"]
    assert data.shape is get_task("classify")
