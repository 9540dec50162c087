"""The preference task: pairs from every table format, conversation pairs, truncation, training with LoRA, IA3
and full fine-tuning (frozen copy or precomputed reference), exact resume, evaluation, refusals.
(The losses against TRL: tests/test_preference_trl.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from clmtune.config import DataConfig, ModelConfig, PeftSettings, PreferenceConfig, RunConfig, TrainConfig, from_dict
from clmtune.data import leading_special_ids, prepare_data
from clmtune.errors import ConfigError
from clmtune.evaluate import evaluate_run
from clmtune.models import load_model, load_tokenizer
from clmtune.tasks.preference_loss import forward_scores
from clmtune.train import train
from clmtune.train.preference import PairCollator

PAIRS = [{"prompt": f"Review {i} of the hotel:", "chosen": f" Clean and quiet, room {i} was great.",
          "rejected": f" Dirty{' and loud' * (i % 3)}, room {i} smelled."} for i in range(12)]


def write(path, rows=PAIRS):
    df = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        df.to_parquet(path)
    return path


def tok():
    return load_tokenizer(ModelConfig("builtin:tiny-opt"))


def test_every_format_and_a_folder_give_the_same_pairs(tmp_path):
    t = tok()
    seen = []
    for suffix in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        src = write(tmp_path / f"pairs{suffix}")
        prep = prepare_data(t, DataConfig(task="preference", source=str(src), eval_fraction=0, max_length=64))
        seen.append({k: prep.train[k] for k in ("input_ids", "labels", "rejected_input_ids", "rejected_labels")})
    assert all(s == seen[0] for s in seen[1:])
    first = seen[0]
    enc = lambda s: t(s, add_special_tokens=False).input_ids  # noqa: E731
    bos, eos = leading_special_ids(t), [t.eos_token_id]
    p, c, r = enc(PAIRS[0]["prompt"]), enc(PAIRS[0]["chosen"]), enc(PAIRS[0]["rejected"])
    assert first["input_ids"][0] == bos + p + c + eos
    assert first["labels"][0] == [-100] * (len(bos) + len(p)) + c + eos
    assert first["rejected_input_ids"][0] == bos + p + r + eos
    assert first["rejected_labels"][0] == [-100] * (len(bos) + len(p)) + r + eos

    folder = tmp_path / "folder"
    folder.mkdir()
    renamed = [{"q": x["prompt"], "good": x["chosen"], "bad": x["rejected"]} for x in PAIRS]
    write(folder / "train.jsonl", renamed[:9])
    write(folder / "dev.jsonl", renamed[9:])
    prep = prepare_data(t, DataConfig(task="preference", source=str(folder), max_length=64, prompt_column="q",
                                      chosen_column="good", rejected_column="bad"))
    assert len(prep.train) == 9 and len(prep.eval) == 3
    assert prep.train["input_ids"] == first["input_ids"][:9]
    assert prep.eval["rejected_input_ids"] == first["rejected_input_ids"][9:]


def test_conversation_pairs_go_through_the_chat_template(tmp_path):
    t = tok()
    shared = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How was the room?"}]
    rows = [{"chosen": shared + [{"role": "assistant", "content": "Lovely and clean."}],
             "rejected": shared + [{"role": "assistant", "content": "Awful."}]}]
    src = write(tmp_path / "conv.jsonl", rows * 2)
    prep = prepare_data(t, DataConfig(task="preference", source=str(src), eval_fraction=0, max_length=128,
                                      chat_template="chatml"))
    prompt = t.apply_chat_template(shared, tokenize=False, add_generation_prompt=True)
    full = t.apply_chat_template(rows[0]["chosen"], tokenize=False)
    assert full.startswith(prompt)
    enc = lambda s: t(s, add_special_tokens=False).input_ids  # noqa: E731
    ids, labels = prep.train["input_ids"][0], prep.train["labels"][0]
    answer = enc(full[len(prompt):]) + [t.eos_token_id]
    assert ids == leading_special_ids(t) + enc(prompt) + answer
    assert [x for x in labels if x != -100] == answer  # the loss on the answer only
    assert t.decode([x for x in prep.train["rejected_labels"][0] if x != -100]).startswith("Awful.")


def test_prompt_is_cut_first_and_pairs_that_cannot_fit_are_dropped(tmp_path):
    t = tok()
    rows = [{"prompt": "word " * 60 + "END:", "chosen": " yes", "rejected": " no"},
            {"prompt": "short:", "chosen": " a" * 40, "rejected": " b"},
            {"prompt": "short:", "chosen": " fine", "rejected": " ok"}]
    src = write(tmp_path / "long.jsonl", rows)
    prep = prepare_data(t, DataConfig(task="preference", source=str(src), eval_fraction=0, max_length=24))
    assert len(prep.train) == 2  # the 40-token response does not fit: dropped, counted
    stats = prep.report["splits"]["train"]
    assert stats["dropped_too_long"] == 1 and stats["truncated"] == 1 and stats["pairs"] == 3
    ids = prep.train["input_ids"][0]
    bos = leading_special_ids(t)
    assert len(ids) == 24 and ids[:len(bos)] == bos  # a BOS kept, the prompt's start cut
    assert t.decode(ids[len(bos):]).startswith(" word") and "END: yes" in t.decode(ids)
    assert len(prep.train["rejected_input_ids"][0]) == 24  # the same prompt cut for both


def cfg(tmp_path, name, method="lora", loss="dpo", precision="auto", **pref):
    src = write(tmp_path / "pairs.jsonl")
    lr = {"lora": 2e-2, "ia3": 5e-2, "full": 2e-3}[method]
    return RunConfig(data=DataConfig(task="preference", source=str(src), eval_fraction=0.25, max_length=48),
                     model=ModelConfig("builtin:tiny-gpt2"), peft=PeftSettings(method=method),
                     train=TrainConfig(output_dir=str(tmp_path / name), epochs=2, batch_size=3, learning_rate=lr,
                                       save_steps=2, save_total_limit=2, precision=precision),
                     preference=PreferenceConfig(loss=loss, **pref)).validate()


def log(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method,loss", [("lora", "dpo"), ("ia3", "ipo"), ("lora", "orpo"), ("lora", "simpo"),
                                         ("full", "dpo")])
def test_training_moves_the_rewards_apart(tmp_path, one_thread, method, loss):
    res = train(cfg(tmp_path, "run", method, loss), progress=False)
    records = log(res.output_dir)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert all(k in r for r in records)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    assert res.final_loss < res.first_loss
    metrics, _ = evaluate_run(res.output_dir, progress=False)
    assert metrics["n"] == 3 and 0 <= metrics["reward_accuracy"] <= 1 and "reward_margin" in metrics
    assert json.loads((res.output_dir / "eval.json").read_text())["reward_accuracy"] == metrics["reward_accuracy"]


def test_adapter_reference_is_the_base_model_and_no_copy(tmp_path, one_thread):
    from clmtune.train import TrainRecipe

    recipe = TrainRecipe(cfg(tmp_path, "run", precision="fp32"), progress=False).setup()
    try:
        assert recipe.objective.ref_model is None  # no second copy of the weights
        with torch.no_grad():  # a trained-looking adapter: the reference must not see it
            for n, p in recipe.model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.5)
        feats = recipe.features[:3]
        batch = PairCollator(recipe.data.pad_id, None)(feats)
        batch.pop("rows")
        base = load_model(ModelConfig("builtin:tiny-gpt2")).eval()
        with torch.no_grad():
            want = forward_scores(base, batch).logps
            policy = forward_scores(recipe.model.eval(), batch).logps
        got = recipe.objective.reference_logps(recipe.model, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (policy - want).abs().max() > 1e-2
    finally:
        recipe.release()


@pytest.mark.slow
def test_precomputed_reference_equals_the_frozen_copy(tmp_path, one_thread):
    a = train(cfg(tmp_path, "copy", "full"), progress=False)
    b = train(cfg(tmp_path, "pre", "full", precompute_reference=True), progress=False)
    la, lb = log(a.output_dir), log(b.output_dir)
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, one_thread, monkeypatch, method):
    import clmtune.train.preference as objective

    straight = train(cfg(tmp_path, "straight", method), progress=False)  # 9 pairs / 3 = 3 steps x 2 epochs
    c = cfg(tmp_path, "crashed", method)
    calls, real = {"n": 0}, objective.pair_losses

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(objective, "pair_losses", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(c, progress=False)
    monkeypatch.setattr(objective, "pair_losses", real)
    resumed = train(c, progress=False, resume="latest")
    assert resumed.resumed_from.name == "step-000004" and resumed.steps == 6
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    wa, wb = load_file(straight.output_dir / name), load_file(resumed.output_dir / name)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in log(resumed.output_dir)] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(log(straight.output_dir), log(resumed.output_dir)):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], abs=1e-5)


def test_bad_settings_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"task": "preference"}, "peft": {"method": "prompt_tuning"},
                   "preference": {"loss": "kto", "beta": 0, "lambda": -1, "label_smoothing": 0.7}}).validate()
    text = str(e.value)
    for part in ("peft.method=prompt_tuning does not work with data.task=preference", "preference.loss='kto'",
                 "preference.beta=0", "preference.lambda=-1", "preference.label_smoothing=0.7"):
        assert part in text
    assert from_dict({"data": {"task": "preference"}, "preference": {"lambda": 0.3}}).preference.lambda_ == 0.3
    src = write(tmp_path / "pairs.jsonl")
    cli = [sys.executable, "-m", "clmtune", "train", "--data.task", "preference", "--data.source", str(src),
           "--peft.method", "p_tuning", "--train.output_dir", str(tmp_path / "x")]
    p = subprocess.run(cli, capture_output=True, text=True)
    assert p.returncode == 2 and "p_tuning does not work with data.task=preference" in p.stderr
    assert not (tmp_path / "x").exists()


def test_metrics_in_tensorboard_and_the_report(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clmtune.report import write_report

    c = cfg(tmp_path, "tb")
    c.train.report_to, c.train.max_steps, c.train.save_steps = ["tensorboard"], 3, None
    res = train(c, progress=False)
    records = log(res.output_dir)
    acc = EventAccumulator(str(res.output_dir / "tensorboard"))
    acc.Reload()
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    assert set(names) <= set(acc.Tags()["scalars"])
    for k in names:
        assert [(e.step, round(e.value, 4)) for e in acc.Scalars(k)] == [(r["step"], round(r[k], 4)) for r in records]
    evaluate_run(res.output_dir, progress=False)
    html = write_report([res.output_dir], tmp_path / "report.html").read_text(encoding="utf-8")
    assert "reward accuracy" in html and "rewards/margins (training, step 3)" in html


def test_a_preference_run_generates_serves_and_exports(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from clmtune.export import export_run
    from clmtune.run import RunDir
    from clmtune.serve.engine import Engine

    shared = [{"role": "user", "content": "How was the room?"}]
    rows = [{"chosen": shared + [{"role": "assistant", "content": f"Lovely and clean {i}."}],
             "rejected": shared + [{"role": "assistant", "content": f"Awful {i}."}]} for i in range(8)]
    c = cfg(tmp_path, "conv", precision="fp32")
    c.data.source, c.data.chat_template = str(write(tmp_path / "conv.jsonl", rows)), "chatml"
    c.train.max_steps, c.train.save_steps = 2, None
    res = train(c, progress=False)
    p = subprocess.run([sys.executable, "-m", "clmtune", "generate", "--run", str(res.output_dir), "--temperature", "0",
                        "--max-new-tokens", "4", "How was the room?"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-500:]
    engine = Engine.load(run=str(res.output_dir), device="cpu")  # what `clmtune serve` / `clmtune chat` load
    assert engine.task_name == "preference" and not engine.classifies
    assert engine.encode_chat(shared)  # the run's tokenizer kept the chat template
    merged = export_run(res.output_dir, tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    model, tok = RunDir(res.output_dir).load_model()
    ids = torch.tensor([tok("How was the room?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_dedup_keeps_pairs_that_differ_only_in_the_rejected_answer(tmp_path):
    from clmtune.data import load_task

    rows = [{"prompt": "写一条酒店评论：", "chosen": "很好", "rejected": "很差"},
            {"prompt": "写一条酒店评论：", "chosen": "很好", "rejected": "太吵"},  # another pair to learn from
            {"prompt": "写一条酒店评论：", "chosen": "很好", "rejected": "很差"}]  # a duplicate
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = load_task(DataConfig(task="preference", source=str(src), eval_fraction=0, dedup=True))
    assert [e.rejected for e in task.train] == ["很差", "太吵"]
