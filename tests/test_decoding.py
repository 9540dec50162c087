"""The one decoding core (``clmtune.decoding``): greedy rows equal ``transformers``' ``generate`` token for token,
a seeded sampled row writes the same text alone and inside any batch, and a stop string cuts the text the same way
in all four users (generate, chat, the server's engine, reply evaluation)."""

from __future__ import annotations

import pytest
import torch

from clmtune.config import GenerateConfig, ModelConfig
from clmtune.decoding import Decoder, Row, Sampling, stop_token_ids
from clmtune.models import load_model, load_tokenizer
from clmtune.tasks.encoding import collate, leading_special_ids

PROMPTS = {
    "builtin:tiny-opt": ["Hello, my name is", "The weather today is very nice and the", "A", "Once upon a time in a"],
    "builtin:gpt2-zh-small": ["房间很干净", "我们去游泳池和健身房吧，然后吃饭，晚上再回酒店休息", "好", "这家酒店的早餐"],
    "builtin:tiny-bloom": ["Hello, my name is", "The weather today is very nice and the", "A", "Once upon a time in a"],
}


def _model(name: str, lora: bool = False):
    cfg = ModelConfig(name)
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules="all-linear"))
        for n, p in model.named_parameters():  # LoRA B starts at 0: make the adapter change the output
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
        model.eval()
    return model, tok


def _ids(tok, texts):
    return [leading_special_ids(tok) + tok(t, add_special_tokens=False).input_ids for t in texts]


def _hf_greedy(model, tok, prompts, new_tokens, stops, repetition_penalty=1.0):
    """``model.generate``'s greedy new tokens of each prompt (one left-padded batch), cut before the first end."""
    batch = collate([{"input_ids": p} for p in prompts], tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                             repetition_penalty=repetition_penalty)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    return [r[:min([r.index(s) for s in stops if s in r], default=len(r))] for r in rows]


@pytest.mark.parametrize("name,lora,penalty", [("builtin:tiny-opt", False, 1.0), ("builtin:tiny-opt", True, 1.0),
                                               ("builtin:gpt2-zh-small", False, 1.0),
                                               ("builtin:gpt2-zh-small", True, 1.0),
                                               ("builtin:tiny-bloom", False, 1.0),
                                               ("builtin:tiny-opt", False, 1.3)])
def test_greedy_rows_equal_transformers_generate_token_for_token(name, lora, penalty, one_thread):
    model, tok = _model(name, lora)
    prompts = _ids(tok, PROMPTS[name])
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded differently
    decoder = Decoder(model, tok)
    rows = [Row(decoder, p, Sampling(max_tokens=20, temperature=0, repetition_penalty=penalty)) for p in prompts]
    decoder.run(rows)
    expected = _hf_greedy(model, tok, prompts, 20, stop_token_ids(tok, model), penalty)
    assert [r.new_ids for r in rows] == expected
    assert sum(map(len, expected)) >= 20  # the rows really generated something
    alone = []
    for p in prompts:  # and a row alone gives what it gives in the batch
        row = Row(decoder, p, Sampling(max_tokens=20, temperature=0, repetition_penalty=penalty))
        decoder.run([row])
        alone.append(row.new_ids)
    assert alone == expected


@pytest.mark.parametrize("name", ["builtin:tiny-opt", "builtin:gpt2-zh-small"])
def test_a_seeded_row_writes_the_same_text_alone_and_in_any_batch(name, one_thread):
    from clmtune.generate import generate

    model, tok = _model(name)
    texts = PROMPTS[name]
    s = GenerateConfig(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1, seed=11,
                       num_return_sequences=2, batch_size=4)
    together = [g.outputs for g in generate(model, tok, texts, s)]
    alone = [generate(model, tok, [t], s)[0].outputs for t in texts]
    pairs = [g.outputs for g in generate(model, tok, texts[::-1], GenerateConfig(**{**s.__dict__, "batch_size": 2}))]
    assert together == alone == pairs[::-1]
    assert all(a != b for a, b in together)  # the two choices of a prompt are sampled apart
    other = [g.outputs for g in generate(model, tok, texts, GenerateConfig(**{**s.__dict__, "seed": 12}))]
    assert other != together


def test_rows_joining_a_running_batch_give_their_own_text(one_thread):
    model, tok = _model("builtin:gpt2-zh-small")
    decoder = Decoder(model, tok)
    prompts = _ids(tok, PROMPTS["builtin:gpt2-zh-small"])
    settings = [Sampling(max_tokens=12, temperature=t, top_k=k, seed=3) for t, k in ((0, 0), (1.0, 10), (0.7, 0),
                                                                                         (1.2, 5))]
    alone = []
    for p, s in zip(prompts, settings):
        row = Row(decoder, p, s)
        decoder.run([row])
        alone.append(row.text)
    rows = [Row(decoder, p, s) for p, s in zip(prompts, settings)]
    waiting = iter(rows[1:])
    decoder.run(rows[:1], intake=lambda room: [r for r in [next(waiting, None)] if r])  # one joins per step
    assert [r.text for r in rows] == alone


def _stop_inside(text: str) -> str:
    """A 2-character piece that first occurs after at least 3 characters."""
    return next(text[i:i + 2] for i in range(3, len(text) - 1)
                if text.find(text[i:i + 2]) == i and len(text[:i].rstrip()) >= 3)


def test_a_stop_string_cuts_alike_in_generate_chat_serve_and_reply_evaluation(one_thread):
    """The same greedy continuation of the same token ids, stopped by the same string, through each user."""
    from clmtune.chat import ChatSession
    from clmtune.evaluate.replies import generate_replies
    from clmtune.generate import generate
    from clmtune.serve.engine import Engine

    model, tok = _model("builtin:gpt2-zh-small")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # the prompt as it is
    prompt = "我们去游泳池和健身房吧"
    s = GenerateConfig(max_new_tokens=24, temperature=0)
    full = generate(model, tok, [prompt], s)[0].outputs[0]
    stop = _stop_inside(full)
    expected = full[:full.find(stop)].rstrip()
    assert len(expected) >= 3
    cut = GenerateConfig(max_new_tokens=24, temperature=0, stop=[stop])

    by_generate = generate(model, tok, [prompt], cut)[0].outputs[0]
    streamed: list[str] = []
    by_chat = ChatSession(model, tok, cut).send(prompt, write=streamed.append)
    engine = Engine(model, tok, "m")
    served: list[str] = []
    row = Row(engine, engine.encode_prompt(prompt), Sampling.of(cut), on_text=lambda r, t: served.append(t))
    engine.run([row])
    ids = _ids(tok, [prompt])
    by_replies = generate_replies(model, tok, ids, 24, end_id=tok.sep_token_id)[0]
    assert by_replies == full  # no stop string: the whole reply
    from clmtune.decoding import Decoder as D  # reply evaluation's stop strings come from the chat template

    row2 = Row(D(model, tok), ids[0], Sampling(max_tokens=24, temperature=0, stop=[stop]))
    D(model, tok).run([row2])
    assert by_generate == by_chat == row.text == row2.text == expected
    assert row.finish_reason == "stop"
    assert "".join(streamed) == expected + "\n" and "".join(served) == expected


def test_stop_tokens_end_a_row_and_are_never_written(one_thread):
    model, tok = _model("builtin:tiny-opt")
    decoder = Decoder(model, tok)
    p = _ids(tok, ["Hello, my name is"])[0]
    first = Row(decoder, p, Sampling(max_tokens=8, temperature=0))
    decoder.run([first])
    stopped = Row(decoder, p, Sampling(max_tokens=8, temperature=0, stop_ids=[first.new_ids[2]]))
    decoder.run([stopped])
    assert stopped.new_ids == first.new_ids[:first.new_ids.index(first.new_ids[2])]
    assert stopped.finish_reason == "stop" and first.finish_reason == "length"


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_rows_follow_the_forward_training_sees(method, one_thread):
    """Virtual tokens live inside peft's forward: such rows are run through it without a cache, and each greedy token
    is the argmax of a plain forward over the row so far (what training and rank scoring compute)."""
    import warnings

    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from clmtune.models import forward_inputs

    config = {"prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig}[method]
    base, tok = _model("builtin:tiny-opt")
    torch.manual_seed(0)
    model = get_peft_model(base, config(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    decoder = Decoder(model, tok)
    assert decoder.recompute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Position ids are not supported ..." for prompt methods
        for prompt in _ids(tok, PROMPTS["builtin:tiny-opt"][:2]):
            row = Row(decoder, prompt, Sampling(max_tokens=6, temperature=0))
            decoder.run([row])
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(6):
                    batch = collate([{"input_ids": seq}], tok.pad_token_id)
                    seq.append(int(model(**forward_inputs(model, batch)).logits[0, -1].argmax()))
                    if seq[-1] in decoder.stop_ids:
                        break
            expected = [t for t in seq[len(prompt):] if t not in decoder.stop_ids]
            assert row.new_ids == expected and expected
            plain_decoder = Decoder(base, tok)  # the base model alone (prompt learning leaves its weights as they are)
            plain = Row(plain_decoder, prompt, Sampling(max_tokens=6, temperature=0))
            plain_decoder.run([plain])
            assert plain.new_ids != row.new_ids  # the virtual tokens change the text


@pytest.mark.parametrize("name", ["builtin:tiny-opt", "builtin:tiny-gpt2-zh"])
def test_eval_method_generate_writes_what_transformers_greedy_writes(name, one_thread):
    """``eval.method: generate`` decodes through the core: the tokens of ``model.generate`` greedy, cut at the end
    token and cleaned by the one text rule (``decoding.decode``: a continuation that starts inside a WordPiece word
    loses the ``##`` it could only have glued to the prompt; before, label generation kept it)."""
    from clmtune.config import DataConfig
    from clmtune.data import ClassificationEncoder, Example
    from clmtune.decoding import decode
    from clmtune.evaluate.predict import predict_generate

    model, tok = _model(name)
    labels = ["complaint", "no complaint", "maybe"] if "opt" in name else ["好", "不好", "一般般"]
    texts = PROMPTS["builtin:tiny-opt" if "opt" in name else "builtin:gpt2-zh-small"]
    enc = ClassificationEncoder(tok, DataConfig(template="{t} label : ", max_length=64))
    examples = [Example(id=str(i), prompt=f"{t} label : ", label=None, text=t) for i, t in enumerate(texts)]
    got = predict_generate(model, enc, examples, labels, batch_size=3, map_invalid=False).predicted
    prompts, _ = enc.encode_eval_prompts(examples, labels)
    rows = _hf_greedy(model, tok, prompts, enc.eval_reserve(labels) + 1, [enc.end_id])
    expected = [decode(tok, r, [], []) for r in rows]
    assert got == expected and any(expected)
    assert not any(t.startswith("##") for t in got)
