"""Bad input to training: one line naming the bad value and the fix, exit status 2 from the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.cli import main
from clmtune.config import ModelConfig, PeftSettings, RunConfig, TrainConfig, from_dict
from clmtune.errors import ClmtuneError, ConfigError
from clmtune.models import apply_peft, load_model
from clmtune.train import train

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def test_unknown_method_and_options_list_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        from_dict({"peft": {"method": "adalora2", "r": 0}}).validate()
    msg = str(exc.value)
    assert "peft.method='adalora2' is not one of lora, prefix_tuning, prompt_tuning, p_tuning, ia3, full" in msg
    assert "peft.r=0" in msg  # every problem at once

    with pytest.raises(ConfigError, match=r"\['lora_rank'\] are not options of LoraConfig .*valid options: .*use_rslora"):
        from_dict({"peft": {"options": {"lora_rank": 4}}}).validate()
    with pytest.raises(ConfigError, match="not options of PromptEncoderConfig.*encoder_hidden_size"):
        from_dict({"peft": {"method": "p_tuning", "options": {"hidden": 4}}}).validate()
    with pytest.raises(ConfigError, match="init_text is only used by prompt_tuning"):
        from_dict({"peft": {"method": "lora", "init_text": "Classify:"}}).validate()
    with pytest.raises(ConfigError, match="full uses no peft config"):
        from_dict({"peft": {"method": "full", "options": {"r": 4}}}).validate()
    # valid options pass through to peft
    cfg = from_dict({"peft": {"method": "p_tuning", "options": {"encoder_hidden_size": 16}}}).validate()
    assert cfg.peft.options == {"encoder_hidden_size": 16}


def test_options_reach_peft(one_thread):
    model = apply_peft(load_model(ModelConfig(name_or_path="builtin:tiny-opt")), PeftSettings(method="p_tuning", options={"encoder_hidden_size": 16}))
    assert model.peft_config["default"].encoder_hidden_size == 16
    model = apply_peft(load_model(ModelConfig(name_or_path="builtin:tiny-opt")), PeftSettings(options={"use_rslora": True, "r": 4}))
    assert model.peft_config["default"].use_rslora and model.peft_config["default"].r == 4


def test_target_module_that_matches_nothing_lists_the_linear_layers(one_thread):
    with pytest.raises(ClmtuneError) as exc:
        apply_peft(load_model(ModelConfig(name_or_path="builtin:tiny-opt")), PeftSettings(target_modules=["query_key_value"]))
    msg = str(exc.value)
    assert "query_key_value" in msg and "'q_proj'" in msg and "'fc1'" in msg and "\n" not in msg


def test_deepspeed_configs_validate():
    for name in ("zero2.json", "zero3_offload.json"):
        cfg = RunConfig(train=TrainConfig(deepspeed=str(REPO_CONFIGS / name))).validate()
        assert cfg.train.deepspeed.endswith(name)
    zero3 = json.loads((REPO_CONFIGS / "zero3_offload.json").read_text())
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_bad_deepspeed_files(tmp_path):
    stage1 = tmp_path / "z1.json"
    stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 3")
    no_gather = tmp_path / "z3.json"
    no_gather.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for path, expected in [(stage1, "stage is 1; clmtune supports ZeRO stage 2 or 3"), (broken, "not valid JSON"),
                           (no_gather, "saves empty adapters"),
                           (tmp_path / "missing.json", "no such file")]:
        with pytest.raises(ConfigError, match=expected):
            RunConfig(train=TrainConfig(deepspeed=str(path))).validate()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_package_says_how_to_get_it(tmp_path):
    cfg = tiny_cfg(tmp_path, deepspeed=str(REPO_CONFIGS / "zero2.json"))
    with pytest.raises(ClmtuneError, match="pip install deepspeed"):
        train(cfg, progress=False)


def test_cli_errors_exit_2(tmp_path, capsys, one_thread):
    assert main(["train", "--output-dir", str(tmp_path / "r"), "--peft.method", "nope"]) == 2
    assert "peft.method='nope'" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "r2"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "r3"), "--resume", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_override_text_ending_in_colon_stays_text():
    from clmtune.config import from_dict, parse_overrides

    got = from_dict(parse_overrides(["--peft.init_text", "Classify if the tweet is a complaint or not:",
                                     "--peft.options", "{use_rslora: true}", "--data.template", "{text} label :"]))
    assert got.peft.init_text == "Classify if the tweet is a complaint or not:"
    assert got.peft.options == {"use_rslora": True}
    assert got.data.template == "{text} label :"


@pytest.mark.slow
def test_gradient_clipping_is_logged_and_changes_the_update(tmp_path, one_thread):
    from clmtune.train import train

    runs = {}
    for name, clip in (("clip", 1e-3), ("free", None)):
        result = train(tiny_cfg(tmp_path, name=name, max_steps=3, max_grad_norm=clip), progress=False)
        log = [json.loads(line) for line in open(result.output_dir / "train_log.jsonl")]
        runs[name] = (dict(result.model.named_parameters()), log)
    (clipped, clip_log), (free, free_log) = runs["clip"], runs["free"]
    assert all(r["grad_norm"] > 1e-3 for r in clip_log)  # norms before clipping: the clip was active every step
    assert all(r["grad_norm"] is None for r in free_log)
    assert clip_log[0]["loss"] == free_log[0]["loss"]  # same weights and batch before the first update
    lora = [k for k in clipped if "lora_" in k]
    assert lora and max(float((clipped[k] - free[k]).abs().max()) for k in lora) > 1e-6
    with pytest.raises(ConfigError, match=r"train.max_grad_norm=0.0 must be > 0"):
        RunConfig(train=TrainConfig(max_grad_norm=0.0)).validate()
