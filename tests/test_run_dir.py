"""The run folder (``clmtune.run.RunDir``): a full fine-tuning run works wherever an adapter run does."""

from __future__ import annotations

import json

import pytest
import torch

from clmtune.cli import main
from clmtune.run import RunDir, write_csv_atomic, write_json_atomic
from tinyrun import one_thread, tiny_cfg  # noqa: F401


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from clmtune.train import train

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_cfg(tmp, method="full", epochs=1, max_steps=2)
    train(cfg, progress=False)
    return RunDir(cfg.train.output_dir)


def test_full_run_is_a_run(full_run, tmp_path):
    assert RunDir.is_run(full_run.path) and full_run.is_finished()
    assert full_run.has_full_model() and not full_run.has_adapter()
    assert not RunDir.is_run(tmp_path)  # an empty folder is not a run
    assert full_run.load_config().peft.method == "full"
    model, tok = full_run.load_model()
    assert not hasattr(model, "peft_config") and not model.training
    assert tok.pad_token_id is not None


@pytest.mark.slow
def test_full_run_generate_eval_export(full_run, tmp_path, capsys):
    # generate --model RUN treats the full run as a run (base model + nothing): same output as --run RUN
    assert main(["generate", "--model", str(full_run.path), "--max-new-tokens", "3", "hello"]) == 0
    by_model = capsys.readouterr().out
    assert main(["generate", "--run", str(full_run.path), "--max-new-tokens", "3", "hello"]) == 0
    assert capsys.readouterr().out == by_model and by_model.startswith("hello\u2192")
    out = tmp_path / "ev"
    assert main(["eval", "--run", str(full_run.path), "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1
    assert (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[0] == "id,text,gold,predicted"
    assert main(["export", "--run", str(full_run.path), "--to", str(tmp_path / "exp")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", use_safetensors=True)
    ours, _ = full_run.load_model()
    for (name, a), (_, b) in zip(ours.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    write_json_atomic(tmp_path / "a" / "x.json", {"k": "中文"})
    write_csv_atomic(tmp_path / "a" / "x.csv", ["id", "v"], [[1, "a,b"]])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.csv", "x.json"]
    assert (tmp_path / "a" / "x.json").read_text(encoding="utf-8") == '{\n  "k": "中文"\n}'
    assert (tmp_path / "a" / "x.csv").read_bytes() == b'id,v\r\n1,"a,b"\r\n'
