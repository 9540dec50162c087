"""Evaluation: rank scoring against a naive reference, metrics by hand, perplexity, label-set errors."""

from __future__ import annotations

import math

import pytest
import torch

from clmtune.config import DataConfig, ModelConfig
from clmtune.data import IGNORE_INDEX, ClassificationEncoder, Example, load_task
from clmtune.evaluate import (RANK_STRATEGIES, LabelTree, classification_metrics, label_scores, perplexity,
                              plot_confusion_matrix, rank_strategy)
from clmtune.models import load_model, load_tokenizer

CASES = {
    # OPT numbers positions from the attention mask; labels of 1, 2 and 4 tokens
    "builtin:tiny-opt": (["complaint", "no complaint", "maybe a complaint here"],
                         ["hello there", "I hate this airline so much, three hours late again", "ok",
                          "what a great day for flying", "@united lost my bag"]),
    # GPT-2 needs explicit position ids under left padding; 5 labels of 1-4 characters -> label chunks of 4 + 1
    "builtin:tiny-gpt2-zh": (["好", "不好", "一般般", "很好", "非常不好"],
                             ["房间很干净", "服务差", "还行吧，早餐一般般，位置不错", "好", "隔音太差了，一晚没睡"]),
    # LLaMA (RoPE from position_ids); labels sharing prefixes, as banking_77's do ("card payment ...")
    "builtin:tiny-llama": (["card payment fee charged", "card payment wrong exchange rate", "card arrival", "cash"],
                           ["why was I charged twice", "my card has not arrived yet, it has been two weeks", "hi"]),
    # BLOOM (ALiBi from a 2D mask: not packed, the shared-cache path)
    "builtin:tiny-bloom": (["card payment fee charged", "card arrival", "no complaint"],
                           ["why was I charged twice", "my card has not arrived yet", "hi"]),
}


def _load(name):
    cfg = ModelConfig(name)
    model = load_model(cfg)
    model.eval()
    return model, load_tokenizer(cfg)


def _naive_scores(model, prompts, conts) -> torch.Tensor:
    """One example and one label at a time, no padding, full logits: sum of log p(label token | everything before)."""
    out = torch.empty(len(prompts), len(conts))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(conts):
                ids = torch.tensor([p + c])
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], -1)
                logp = logp[-ids.shape[1]:]  # prompt-learning models prepend virtual-token positions
                out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
    return out


def _prompts(tok, texts):
    enc = ClassificationEncoder(tok, DataConfig(template="{t} label : ", max_length=64))
    exs = [Example(id=str(i), prompt=f"{t} label : ", label=None, text=t) for i, t in enumerate(texts)]
    return enc, enc.encode_prompts(exs)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_rank_equals_naive_argmax_over_label_loglikelihoods(name):
    model, tok = _load(name)
    labels, texts = CASES[name]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    naive = _naive_scores(model, prompts, conts)
    for batch_size in (1, 2):
        for strategy in RANK_STRATEGIES:
            if strategy == "packed" and "bloom" in name:
                continue  # BLOOM builds ALiBi from a 2D mask: it cannot take the packed 4D mask
            got = label_scores(model, enc, prompts, labels, batch_size, strategy=strategy)
            torch.testing.assert_close(got, naive, atol=1e-4, rtol=1e-5)
            assert got.argmax(1).tolist() == naive.argmax(1).tolist()
    lengths = torch.tensor([float(len(c)) for c in conts])
    normed = label_scores(model, enc, prompts, labels, 2, normalize=True)
    torch.testing.assert_close(normed, naive / lengths, atol=1e-4, rtol=1e-5)
    assert rank_strategy(model) == ("shared_cache" if "bloom" in name else "packed")


def test_label_tree_runs_a_shared_prefix_once():
    # continuations (label tokens + end token 9): [1 2 3 9], [1 2 4 9], [1 9], [5 9]
    tree = LabelTree.build([[1, 2, 3, 9], [1, 2, 4, 9], [1, 9], [5, 9]])
    # nodes: (1) (1 2) (1 2 3) (1 2 4) (5) -- "1" and "1 2" once for three labels
    assert tree.token == [1, 2, 3, 4, 5] and tree.depth == [0, 1, 2, 2, 0]
    assert tree.ancestors.int().tolist() == [[1, 0, 0, 0, 0],
                                             [1, 1, 0, 0, 0],
                                             [1, 1, 1, 0, 0],
                                             [1, 1, 0, 1, 0],
                                             [0, 0, 0, 0, 1]]
    # (source, token, label); source 0 = prompt's last position, 1 + i = node i
    assert tree.steps.tolist() == [[0, 1, 0], [1, 2, 0], [2, 3, 0], [3, 9, 0],
                                   [0, 1, 1], [1, 2, 1], [2, 4, 1], [4, 9, 1],
                                   [0, 1, 2], [1, 9, 2],
                                   [0, 5, 3], [5, 9, 3]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rank_with_lora_and_either_attention_matches_naive(attn):
    from peft import LoraConfig, TaskType, get_peft_model

    from clmtune.models import load_model as load

    base = load(ModelConfig("builtin:tiny-llama"))
    base.set_attn_implementation(attn)
    tok = load_tokenizer(ModelConfig("builtin:tiny-llama"))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapter change the scores
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    labels, texts = CASES["builtin:tiny-llama"]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    assert rank_strategy(model) == "packed"
    got = label_scores(model, enc, prompts, labels, 3)
    naive = _naive_scores(model, prompts, conts)
    torch.testing.assert_close(got, naive, atol=1e-4, rtol=1e-5)
    with model.disable_adapter():  # the adapter is really in the scored forward
        without = label_scores(model, enc, prompts, labels, 3)
    assert (got - without).abs().max() > 1e-2


def test_rank_with_a_prompt_tuning_adapter_matches_naive():
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base, tok = _load("builtin:tiny-opt")
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.eval()
    labels, texts = CASES["builtin:tiny-opt"]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    got = label_scores(model, enc, prompts, labels, 2)  # picks the padded path for prompt learning
    torch.testing.assert_close(got, _naive_scores(model, prompts, conts), atol=1e-4, rtol=1e-5)


def test_classification_metrics_by_hand(tmp_path):
    labels = ["a", "b", "c"]
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "xyz", "c", "a"]  # "xyz" is an invalid generate output: wrong, FP for no class
    m = classification_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # a: P=1/2 R=1/2 F=1/2; b: P=1/2 R=1/2 F=1/2; c: P=1 R=1/2 F=2/3
    assert m["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"]["rows_gold_cols_predicted"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["confusion_matrix"]["invalid_per_gold"] == [0, 1, 0]
    png = plot_confusion_matrix(m["confusion_matrix"], tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_is_token_weighted_and_ignores_padding():
    model, tok = _load("builtin:tiny-gpt2-zh")
    texts = ["今天天气很好", "我们去游泳池和健身房吧，然后一起吃饭", "好"]
    feats = []
    for k, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False).input_ids
        labels = list(ids)
        if k == 1:
            labels[:3] = [IGNORE_INDEX] * 3  # an unscored prefix (a prompt)
        feats.append({"input_ids": ids, "labels": labels})
    nll, n = 0.0, 0
    with torch.no_grad():
        for f in feats:  # reference: one unpadded row at a time
            logp = torch.log_softmax(model(input_ids=torch.tensor([f["input_ids"]])).logits[0], -1)
            for t in range(1, len(f["labels"])):
                if f["labels"][t] != IGNORE_INDEX:
                    nll -= logp[t - 1, f["labels"][t]].item()
                    n += 1
    for batch_size in (1, 3):  # batch 3 left-pads the short rows
        got = perplexity(model, feats, tok.pad_token_id, batch_size)
        lengths = [len(f["input_ids"]) for f in feats]
        assert got["tokens"] == n == (lengths[0] - 1) + (lengths[1] - 3) + (lengths[2] - 1)
        assert got["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_rank_eval_on_real_data_never_invalid():
    model, tok = _load("builtin:tiny-opt")
    cfg = DataConfig(max_length=64)
    task = load_task(cfg)
    enc = ClassificationEncoder(tok, cfg)
    prompts, _ = enc.encode_prompts(task.eval, reserve=4)
    scores = label_scores(model, enc, prompts, task.labels, 4)
    assert scores.shape == (len(task.eval), 2) and torch.isfinite(scores).all()
    assert (scores < 0).all()


def test_device_names_are_checked_with_the_fix_in_the_message():
    from clmtune.config import RunConfig
    from clmtune.errors import ClmtuneError, ConfigError
    from clmtune.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ClmtuneError, match=r"device 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ClmtuneError, match=r"device 'cuda:1': torch .* sees 0 CUDA GPU\(s\); use cpu or auto"):
            resolve_device("cuda:1")
    cfg = RunConfig()
    cfg.eval.device, cfg.generate.device = "cuda0", "tpu"
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "eval.device='cuda0' is not a device" in str(err.value)
    assert "generate.device='tpu' is not a device" in str(err.value)


@pytest.mark.parametrize("arch,window", [("mistral", None), ("qwen2", None), ("qwen3", None), ("mistral", 6)])
def test_packed_rank_on_the_other_allowlisted_architectures(arch, window):
    """PACKED_MODEL_TYPES lists these without a built-in model: tiny random ones from a config, OPT's tokenizer.
    A sliding window shorter than the prompts makes ``label_scores`` use prompt+label rows (the packed mask has no
    window: 0.36 off here; the shared cache misplaces it with left padding: 0.12 off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = _load("builtin:tiny-opt")
    config = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=256, pad_token_id=tok.pad_token_id, sliding_window=window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    labels, texts = CASES["builtin:tiny-llama"]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    assert rank_strategy(model) == "packed"
    torch.testing.assert_close(label_scores(model, enc, prompts, labels, 2), _naive_scores(model, prompts, conts),
                               atol=1e-4, rtol=1e-5)
