"""A newcomer's first run on their own data: each test is what they type and what they should see.

The data are small CSV files cut from the shipped ChnSentiCorp reviews (Chinese) and RAFT tweets (English), the
way a user would bring their own file; training runs are 1-2 steps on tiny or the shipped small model.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from clmtune.cli import main
from clmtune.config import load_config, parse_overrides
from clmtune.data import assets_path

REPO = Path(__file__).resolve().parents[1]
ZH = ["--data.template", "评论：{review} 评价：", "--data.label_column", "label", "--data.labels", "[差评, 好评]"]
EN = ["--data.template", "Tweet : {Tweet text} label : ", "--data.labels", "[complaint, no complaint]"]


def reviews_csv(tmp_path: Path, n: int = 40, max_chars: int = 60) -> Path:
    """n short hotel reviews (both labels) as a user's own CSV: columns label,review."""
    rows = [r for r in csv.DictReader(open(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"), encoding="utf-8"))
            if r["review"] and len(r["review"]) <= max_chars]
    pos, neg = [r for r in rows if r["label"] == "1"], [r for r in rows if r["label"] == "0"]
    picked = [r for pair in zip(pos, neg) for r in pair][:n]
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "review"])
        w.writeheader()
        w.writerows(picked)
    return path


def tweets_csv(tmp_path: Path, n: int = 24) -> Path:
    rows = list(csv.DictReader(open(assets_path("raft/twitter_complaints/train.csv"), encoding="utf-8")))[:n]
    path = tmp_path / "tweets.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err




# --- item 3: any number form a person writes ----------------------------------------------------------------


def test_numbers_as_people_write_them_on_the_command_line_and_in_yaml(tmp_path):
    # clmtune train --train.learning_rate 3e-4 --train.max_steps 1e3 --data.eval_fraction .5 --train.epochs 1_000
    cfg = load_config(None, parse_overrides(["--train.learning_rate", "3e-4", "--train.max_steps", "1e3",
                                             "--data.eval_fraction", ".5", "--train.epochs", "1_000",
                                             "--train.max_grad_norm", "2E+0"]))
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.eval_fraction == 0.5 and cfg.train.epochs == 1000 and cfg.train.max_grad_norm == 2.0
    # the same in a YAML file, where YAML 1.1 reads 3e-4 and 1e3 as strings
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 3e-4\n  max_steps: 1e3\n  weight_decay: 1e-2\n", encoding="utf-8")
    cfg = load_config(f)
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.train.weight_decay) == (3e-4, 1000, 0.01)


def test_what_is_not_a_number_is_still_one_clear_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--output-dir", tmp_path / "o", "--train.learning_rate", "fast",
                       "--train.max_steps", "2.5")
    assert code == 2
    assert "train.learning_rate='fast' must be a number (e.g. 3e-4)" in err
    assert "train.max_steps=2.5 must be an integer" in err


# --- item 2: a learning rate per method ---------------------------------------------------------------------


def test_learning_rate_auto_is_chosen_per_method_and_overridable():
    from clmtune.defaults import resolve_defaults

    for method, lr in (("lora", 2e-3), ("full", 3e-4), ("prompt_tuning", 3e-2)):
        cfg = load_config(None, parse_overrides(["--peft.method", method, "--model.name_or_path",
                                                 "builtin:tiny-opt", "--data.max_length", "64"]))
        assert cfg.train.learning_rate is None  # "auto" until the run starts
        resolved, chosen = resolve_defaults(cfg, announce=False)
        assert resolved.train.learning_rate == lr
        assert chosen["train.learning_rate"] == {"value": lr, "why": f"the default for peft.method={method}"}
    cfg = load_config(None, parse_overrides(["--peft.method", "full", "--train.learning_rate", "auto",
                                             "--model.name_or_path", "builtin:tiny-opt"]))
    assert cfg.train.learning_rate is None
    cfg = load_config(None, parse_overrides(["--peft.method", "full", "--train.learning_rate", "1e-5",
                                             "--model.name_or_path", "builtin:tiny-opt", "--data.max_length", "64"]))
    resolved, chosen = resolve_defaults(cfg, announce=False)
    assert resolved.train.learning_rate == 1e-5 and "train.learning_rate" not in chosen


def test_full_fine_tuning_trains_with_its_own_rate_and_the_summary_says_so(tmp_path, capsys, one_thread):
    # clmtune train --data.source tweets.csv ... --peft.method full   (no learning rate given)
    run_dir = tmp_path / "full"
    code, out, _ = run(capsys, "train", "--data.source", tweets_csv(tmp_path), *EN, "--model.name_or_path",
                       "builtin:tiny-gpt2", "--peft.method", "full", "--train.max_steps", "2", "--train.batch_size",
                       "4", "--output-dir", run_dir, "--no-eval")
    assert code == 0
    summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["learning_rate"] == 3e-4
    assert summary["auto"]["train.learning_rate"]["value"] == 3e-4
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["learning_rate"] == pytest.approx(3e-4 / 2)  # linear decay over 2 steps from 3e-4
    assert load_config(run_dir / "config.yaml").train.learning_rate == 3e-4  # the saved config is the resolved one


# --- item 8: adapter keys with peft.method: full --------------------------------------------------------------


def test_full_with_lora_keys_left_in_the_config_warns_once_naming_them(tmp_path, caplog):
    from clmtune.defaults import resolve_defaults

    f = tmp_path / "c.yaml"
    f.write_text("model: {name_or_path: 'builtin:tiny-opt'}\ndata: {max_length: 64}\n"
                 "peft:\n  method: full\n  r: 16\n  target_modules: [c_attn, wte]\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="clmtune"):
        resolve_defaults(load_config(f))
    warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warned) == 1
    assert "peft.r=16" in warned[0] and "peft.target_modules=['c_attn', 'wte']" in warned[0]
    assert "lora_alpha" not in warned[0]  # left at its default: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clmtune"):  # the same keys with LoRA: no warning
        resolve_defaults(load_config(f, parse_overrides(["--peft.method", "lora"])), announce=True)
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


# --- item 9: a label list without brackets ----------------------------------------------------------------------


def test_labels_without_brackets_say_how_to_write_the_list(tmp_path, capsys):
    # clmtune prepare --data.labels "差评, 好评"
    code, _, err = run(capsys, "prepare", "--data.source", reviews_csv(tmp_path), "--data.template", "{review}",
                       "--data.label_column", "label", "--data.labels", "差评, 好评")
    assert code == 2
    assert "data.labels is one label '差评, 好评'; for 2 labels write the list in brackets: " \
           '--data.labels "[差评, 好评]"' in err
    code, _, err = run(capsys, "prepare", "--data.source", reviews_csv(tmp_path), "--data.template", "{review}",
                       "--data.label_column", "label", "--data.labels", "差评，好评")  # full-width comma
    assert code == 2 and '"[差评, 好评]"' in err


# --- item 10: tables with Chinese text -----------------------------------------------------------------------


def _column_starts(line: str) -> list[int]:
    """Terminal column where each cell of a table line starts (cells are separated by 2+ spaces)."""
    from clmtune.text import display_width

    starts, i = [], 0
    for cell in re.split(r" {2,}", line.strip()):
        i = line.index(cell, i)
        starts.append(display_width(line[:i]))
        i += len(cell)
    return starts


def test_tables_align_chinese_text_by_display_width():
    from clmtune.text import display_width, format_table

    assert display_width("好评") == 4 and display_width("ok") == 2 and display_width("，") == 2
    table = format_table(["步骤", "value"], [["好评", "0.83"], ["total", "12s"]], align="<>")
    assert table.splitlines() == ["步骤   value",
                                  "-----  -----",
                                  "好评    0.83",
                                  "total    12s"]


def test_prepare_table_lines_up_with_a_chinese_file_name(tmp_path, capsys):
    src = reviews_csv(tmp_path)
    renamed = src.with_name("酒店评论.csv")
    src.rename(renamed)
    code, out, _ = run(capsys, "prepare", "--data.source", renamed, *ZH, "--model.name_or_path",
                       "builtin:gpt2-zh-small")
    assert code == 0
    head, rule, *rows = out.split("\n\n")[0].splitlines()
    assert rows[0].startswith("train  ") and "酒店评论.csv" in rows[0] and len(rows) == 2
    for row in rows:  # the read/dropped/rows columns start in the header's terminal column
        assert _column_starts(row)[:5] == _column_starts(head)[:5]


# --- item 7: no library noise ----------------------------------------------------------------------------------


def test_lora_on_gpt2_conv1d_is_configured_without_peft_warning():
    from clmtune.config import ModelConfig, PeftSettings
    from clmtune.models import apply_peft, load_model

    base = load_model(ModelConfig(name_or_path="builtin:tiny-gpt2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_peft(base, PeftSettings(method="lora"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "fan_in_fan_out" in m]
    assert model.peft_config["default"].fan_in_fan_out is True
    # the library noise the CLI must hide really is raised here
    assert [m for m in messages if "is_gradient_checkpointing" in m]


@pytest.mark.slow
def test_cli_hides_library_deprecation_noise_but_debug_shows_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    args = [sys.executable, "-m", "clmtune", "train", "--data.source", str(tweets_csv(tmp_path)), *EN,
            "--model.name_or_path", "builtin:tiny-gpt2", "--train.max_steps", "1", "--no-eval"]
    quiet = subprocess.run(args + ["--output-dir", str(tmp_path / "a")], capture_output=True, text=True, env=env,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Warning" not in quiet.stderr and "fan_in_fan_out" not in quiet.stderr
    loud = subprocess.run([args[0], "-m", "clmtune", "--debug", *args[3:], "--output-dir", str(tmp_path / "b")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "FutureWarning" in loud.stderr and "is_gradient_checkpointing" in loud.stderr


# --- item 1: defaults chosen from the data -----------------------------------------------------------------------


@pytest.mark.slow
def test_chinese_csv_without_a_model_uses_the_shipped_chinese_model(tmp_path, capsys, caplog, one_thread):
    # clmtune train --data.source reviews.csv --data.template "评论：{review} 评价：" ...   (no model, no max_length)
    run_dir = tmp_path / "zh"
    with caplog.at_level(logging.INFO, logger="clmtune"):
        code, out, _ = run(capsys, "train", "--data.source", reviews_csv(tmp_path), *ZH, "--train.max_steps", "1",
                           "--output-dir", run_dir, "--no-eval")
    assert code == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "model.name_or_path: auto -> builtin:gpt2-zh-small (" in logged
    assert "are Chinese characters" in logged and "RANDOM" not in logged
    summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == "builtin:gpt2-zh-small"
    assert summary["auto"]["model.name_or_path"]["cjk_share"] > 0.9
    # data.max_length: auto -> p99 of prompt + label + end, rounded up to 8, printed with the rows it cuts
    from clmtune.models import load_tokenizer
    from clmtune.config import ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path="builtin:gpt2-zh-small"))
    cfg = load_config(run_dir / "config.yaml")
    from clmtune.data import load_task

    train = load_task(cfg.data).train
    lengths = sorted(len(tok(e.prompt, add_special_tokens=False).input_ids)
                     + len(tok(e.label, add_special_tokens=False).input_ids) + 1 for e in train)
    p99 = lengths[-(-99 * len(lengths) // 100) - 1]
    expected = -(-p99 // 8) * 8
    assert summary["max_length"] == cfg.data.max_length == expected
    cut = sum(n > expected for n in lengths)
    assert summary["auto"]["data.max_length"]["rows_cut"] == cut == summary["truncated_train_rows"]
    assert f"data.max_length: auto -> {expected} (" in logged and f": {cut} of {len(lengths)} training rows" in logged


def test_english_csv_without_a_model_warns_loudly_about_random_weights(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="clmtune"):
        code, out, _ = run(capsys, "prepare", "--data.source", tweets_csv(tmp_path), *EN)
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("builtin:tiny-opt has RANDOM weights" in m and "--model.name_or_path" in m for m in warned)
    assert "model.name_or_path: auto -> builtin:tiny-opt" in out  # also in prepare's report


def test_an_explicit_max_length_that_cuts_many_rows_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clmtune"):
        code = main(["prepare", "--data.source", str(reviews_csv(tmp_path)), *ZH, "--data.max_length", "16"])
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if "cuts" in r.getMessage()]
    assert len(warned) == 1 and "data.max_length=16 cuts" in warned[0] and "set it to auto" in warned[0]


def test_auto_max_length_is_capped_by_the_model_context():
    from clmtune.data.profile import auto_max_length, cjk_share

    assert auto_max_length(list(range(1, 101)), None) == (104, {"value": 104, "p99_tokens": 99, "longest_tokens": 100,
                                                               "model_context": None, "rows": 100, "rows_cut": 0})
    value, facts = auto_max_length([10] * 50 + [900] * 50, 256)
    assert value == 256 and facts["rows_cut"] == 50
    assert cjk_share(["房间很干净 clean"]) == pytest.approx(5 / 10)
    assert cjk_share(["The room was clean"]) == 0.0


# --- item 4: a subset of rows -------------------------------------------------------------------------------------


def test_max_train_rows_samples_reproducibly_with_the_split_seed_and_is_counted(tmp_path, capsys):
    from clmtune.config import DataConfig
    from clmtune.data import load_task

    src = str(reviews_csv(tmp_path, n=40))
    kw = dict(source=src, template="{review}", label_column="label", labels=["差评", "好评"])
    full = load_task(DataConfig(**kw))
    a = load_task(DataConfig(**kw, max_train_rows=10, max_eval_rows=3))
    b = load_task(DataConfig(**kw, max_train_rows=10, max_eval_rows=3))
    other = load_task(DataConfig(**kw, max_train_rows=10, max_eval_rows=3, seed=7))
    assert [e.id for e in a.train] == [e.id for e in b.train] and len(a.train) == 10 and len(a.eval) == 3
    assert {e.id for e in a.train} < {e.id for e in full.train}  # drawn from the training split only
    assert {e.id for e in a.eval} < {e.id for e in full.eval}
    assert [e.id for e in other.train] != [e.id for e in a.train]
    assert a.report["rows_before_sampling"] == {"train": 32, "eval": 8}
    assert a.report["sampled"] == {"train": 10, "eval": 3, "seed": 123}
    code, out, _ = run(capsys, "prepare", "--data.source", src, *ZH, "--data.max_train_rows", "10",
                       "--data.max_eval_rows", "3", "--model.name_or_path", "builtin:gpt2-zh-small")
    assert code == 0
    assert "sampled with seed 123: train 10 of 32 rows (data.max_train_rows), eval 3 of 8" in out


# --- item 5: each evaluation in its own place ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def zh_run(tmp_path_factory):
    """A 1-step LoRA run of the shipped Chinese model on 40 reviews (8 held out), max_length 32 so prompts get cut."""
    import torch

    tmp = tmp_path_factory.mktemp("zh_run")
    torch.set_num_threads(1)
    code = main(["train", "--data.source", str(reviews_csv(tmp)), *ZH, "--model.name_or_path",
                 "builtin:gpt2-zh-small", "--data.max_length", "32", "--train.max_steps", "1", "--output-dir",
                 str(tmp / "run")])
    assert code == 0
    return tmp / "run"


@pytest.mark.slow
def test_evaluating_twice_keeps_both_and_summarises_the_latest(zh_run, tmp_path, capsys):
    # train already evaluated the held-out split with rank: RUN/eval/eval-rank/
    rank_dir = zh_run / "eval" / "eval-rank"
    rank_json = (rank_dir / "eval.json").read_bytes()
    assert (rank_dir / "predictions.csv").is_file() and (rank_dir / "confusion_matrix.png").is_file()
    # clmtune eval --run RUN --method generate: its own folder; rank's files untouched
    code, out, _ = run(capsys, "eval", "--run", zh_run, "--method", "generate")
    assert code == 0 and str(zh_run / "eval" / "eval-generate" / "eval.json") in out
    assert (rank_dir / "eval.json").read_bytes() == rank_json
    gen = json.loads((zh_run / "eval" / "eval-generate" / "eval.json").read_text(encoding="utf-8"))
    latest = json.loads((zh_run / "eval.json").read_text(encoding="utf-8"))
    assert latest == {**gen, "folder": "eval/eval-generate"}
    # clmtune eval --run RUN --data other.csv: a third folder, named after the file
    other = tmp_path / "other.csv"
    other.write_text("label,review\n1,房间很干净\n0,早餐太差了\n", encoding="utf-8")
    assert run(capsys, "eval", "--run", zh_run, "--data", other)[0] == 0
    index = json.loads((zh_run / "eval" / "index.json").read_text(encoding="utf-8"))
    assert set(index) == {"eval/eval-rank", "eval/eval-generate", "eval/file-other-rank"}
    assert index["eval/eval-generate"]["method"] == "generate" and index["eval/file-other-rank"]["n"] == 2
    assert index["eval/eval-rank"]["accuracy"] == json.loads(rank_json)["accuracy"]
    assert json.loads((zh_run / "eval.json").read_text(encoding="utf-8"))["folder"] == "eval/file-other-rank"


# --- item 6: one definition of a truncated prompt -------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_rank_and_generate_report_the_same_truncated_count(zh_run, capsys):
    # clmtune prepare --config RUN/config.yaml, then clmtune eval --method rank / generate: one number
    code, out, _ = run(capsys, "prepare", "--config", zh_run / "config.yaml")
    assert code == 0
    said = [line for line in out.splitlines() if line.startswith("evaluation (rank and generate) cuts")]
    counts = {}
    for method in ("rank", "generate"):
        assert run(capsys, "eval", "--run", zh_run, "--method", method)[0] == 0
        counts[method] = json.loads((zh_run / "eval" / f"eval-{method}" / "eval.json").read_text())["truncated_prompts"]
    n_eval = json.loads((zh_run / "train_summary.json").read_text(encoding="utf-8"))["data"]["eval"]
    assert n_eval == 8 and counts["rank"] == counts["generate"] > 0
    assert said == [f"evaluation (rank and generate) cuts {counts['rank']} of {n_eval} eval prompts: they leave room "
                    "for the longest label + end token; 'truncated' above counts each row with its own label"]


@pytest.mark.slow
def test_training_again_with_overwrite_forgets_the_old_evaluations(zh_run, capsys):
    assert (zh_run / "eval" / "index.json").is_file() and (zh_run / "eval.json").is_file()
    code, _, _ = run(capsys, "train", "--config", zh_run / "config.yaml", "--overwrite", "--no-eval")
    assert code == 0
    assert not (zh_run / "eval").exists() and not (zh_run / "eval.json").exists()


def test_a_prompt_that_just_fits_is_cut_by_neither_rank_nor_generate():
    """max_length 20, labels of 2 tokens + end: a 17-token prompt fits exactly, an 18-token one is cut, the same
    for both methods (generate used to leave room for one more token and cut the 17-token prompt too)."""
    from clmtune.config import DataConfig, ModelConfig
    from clmtune.data import Encoder
    from clmtune.evaluate.predict import predict_generate
    from clmtune.rank.predict import predict_rank
    from clmtune.models import load_model, load_tokenizer
    from clmtune.tasks.examples import Example

    model_cfg = ModelConfig(name_or_path="builtin:tiny-gpt2-zh")
    tok, model = load_tokenizer(model_cfg), load_model(model_cfg).eval()
    enc = Encoder(tok, DataConfig(template="{review}", label_column="label", max_length=20))
    labels = ["差评", "好评"]
    assert enc.eval_reserve(labels) == 3
    fits, cut = "房" * 17, "房" * 18
    assert [len(ids) for ids in enc.encode_texts([fits, cut])] == [17, 18]
    for prompts, expected in (([fits], 0), ([cut], 1), ([fits, cut, fits], 1)):
        examples = [Example(id=str(i), prompt=p, label="好评", text=p) for i, p in enumerate(prompts)]
        assert predict_rank(model, enc, examples, labels, 4).truncated == expected
        assert predict_generate(model, enc, examples, labels, 4).truncated == expected


def test_the_shipped_chinese_model_gets_the_lora_targets_it_learns_with():
    """Chosen by auto (or named) with LoRA and no target_modules: every linear layer + the character embedding,
    r 64 and lr 1e-3, as configs/chnsenticorp_classify.yaml (peft's default c_attn alone stays at the majority
    class; r 16 at LoRA's general 2e-3 is 3-4 points worse on ChnSentiCorp)."""
    from clmtune.defaults import resolve_defaults

    cfg = load_config(None, parse_overrides(["--model.name_or_path", "builtin:gpt2-zh-small", "--data.max_length",
                                             "64"]))
    resolved, chosen = resolve_defaults(cfg, announce=False)
    assert resolved.peft.target_modules == ["c_attn", "c_proj", "c_fc", "wte"] and resolved.peft.r == 64
    assert chosen["peft.target_modules"]["value"] == ["c_attn", "c_proj", "c_fc", "wte"]
    assert resolved.train.learning_rate == 1e-3 and "gpt2-zh-small" in chosen["train.learning_rate"]["why"]
    mine = load_config(None, parse_overrides(["--model.name_or_path", "builtin:gpt2-zh-small", "--data.max_length",
                                              "64", "--peft.target_modules", "[c_attn]", "--peft.r", "4"]))
    resolved, chosen = resolve_defaults(mine, announce=False)  # the user's own choice stays
    assert resolved.peft.target_modules == ["c_attn"] and resolved.peft.r == 4 and "peft.target_modules" not in chosen
    full = load_config(None, parse_overrides(["--model.name_or_path", "builtin:gpt2-zh-small", "--data.max_length",
                                              "64", "--peft.method", "full"]))
    assert resolve_defaults(full, announce=False)[0].train.learning_rate == 3e-4  # full keeps its own default
