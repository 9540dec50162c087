"""Chat runs end to end: training on the assistant's turns through the usual fast path, the template saved with
the run, evaluation files, and a resumed chat run equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from chatrun import chat_cfg
from safetensors.torch import load_file

import clmtune.train.step as train_mod
from clmtune.chat_templates import BUILTIN_TEMPLATES
from clmtune.evaluate import evaluate_run
from clmtune.run import RunDir
from clmtune.train import list_checkpoints, train


@pytest.mark.slow
def test_chat_run_learns_saves_template_and_is_evaluated(chat_run):
    run, _ = chat_run
    rd = RunDir(run)
    summary = rd.load_summary()
    assert summary["final_loss"] < summary["first_loss"] / 10  # 12 conversations, memorised
    import transformers.modeling_utils as mu

    # the LM head ran on the assistant positions only (transformers with slice_logits_to_keep, 5.1x on), else on
    # the last positions that hold every supervised one (transformers 5.0, the floor)
    assert summary["lm_head_positions"] == ("mask" if hasattr(mu, "slice_logits_to_keep") else "last")
    conv = summary["conversations"]["train"]
    assert conv["conversations"] == 9 and conv["dropped_too_long"] == 0 and conv["turns"] >= 9
    tok = rd.load_tokenizer()
    assert tok.chat_template == BUILTIN_TEMPLATES["zh"]  # generate/chat/serve format prompts as training did
    metrics, where = evaluate_run(run, progress=False)
    assert metrics["method"] == "perplexity+replies" and metrics["n"] == 3
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    r = metrics["replies"]
    assert r["n"] == 3 and 0 <= r["rouge_l"] <= 100 and 0 <= r["bleu4"] <= 100
    rows = [json.loads(x) for x in (where / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "reference", "generated", "earlier_turns"}
    assert (where / "predictions.csv").read_text(encoding="utf-8").startswith("prompt,reference,generated")
    assert json.loads((where / "eval.json").read_text())["replies"]["rouge_l"] == r["rouge_l"]


def test_chat_training_batches_are_assistant_masked(tmp_path):
    """What the training loop sees: left-padded length-grouped batches whose labels are the assistant tokens."""
    from clmtune.data import prepare_data
    from clmtune.models import load_tokenizer

    cfg = chat_cfg(tmp_path).validate()
    tok = load_tokenizer(cfg.model)
    prep = prepare_data(tok, cfg.data)
    row = prep.train[0]
    text = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]).replace(" ", "")
    assert text.endswith("[SEP]") and "用户" not in text and "助手" not in text


def test_resumed_chat_run_equals_uninterrupted(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    kw = dict(epochs=2, save_steps=2, save_total_limit=2)  # 9 conversations / batch 4 = 3 steps per epoch
    full = train(chat_cfg(tmp_path, "straight", **kw).validate(), progress=False)
    calls = {"n": 0}
    real_loss = train_mod.causal_lm_loss

    def crash_on_fifth_batch(logits, labels, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_loss(logits, labels, **k)

    cfg = chat_cfg(tmp_path, "crashed", **kw).validate()
    monkeypatch.setattr(train_mod, "causal_lm_loss", crash_on_fifth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False)
    monkeypatch.setattr(train_mod, "causal_lm_loss", real_loss)
    out = tmp_path / "crashed"
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    resumed = train(cfg, progress=False, resume="latest")
    assert resumed.steps == 6 and resumed.resumed_from.name == "step-000004"
    a, b = load_file(full.output_dir / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-5)
    assert RunDir(out).load_tokenizer().chat_template == BUILTIN_TEMPLATES["zh"]


def test_evaluating_a_chat_run_reads_and_tokenizes_only_what_it_scores(chat_run, monkeypatch, tmp_path):
    """One pass: the source is read once, only the held-out split is tokenized (3 conversations, not the 9 of
    train as well), and ``eval.json`` is written once, with the perplexity and the reply scores together."""
    import dataclasses

    import clmtune.evaluate.report as report_mod
    from clmtune.data.readers import READERS
    from clmtune.tasks.chat import ChatTask

    import shutil

    run = shutil.copytree(chat_run[0], tmp_path / "run")  # the session's run stays as other tests expect it
    encoded, reads, writes = [], [], []
    encode, json_reader, write = ChatTask.encode, READERS["json"], report_mod.write_json_atomic
    monkeypatch.setattr(ChatTask, "encode", lambda self, batch, *a, **k:
                        encoded.append(len(batch["messages"])) or encode(self, batch, *a, **k))
    monkeypatch.setitem(READERS, "json", dataclasses.replace(
        json_reader, read_nested=lambda path, o: reads.append(path) or json_reader.read_nested(path, o)))
    monkeypatch.setattr(report_mod, "write_json_atomic", lambda path, *a: writes.append(path) or write(path, *a))
    metrics, where = evaluate_run(run, out_dir=tmp_path / "ev", progress=False)
    assert metrics["n"] == 3 and metrics["replies"]["n"] == 3
    assert encoded == [3] and len(reads) == 1
    assert writes == [tmp_path / "ev" / "eval.json"]
