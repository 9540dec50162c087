"""The GPU speed paths (clmtune.train.speed), proven on the CPU: each gives the plain path's loss and gradients."""

from __future__ import annotations

import json

import pytest
import torch
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.errors import ClmtuneError
from clmtune.train import train
from clmtune.train.speed import (LossBuffer, chunk_rows, chunked_head_loss, compile_forward, compile_ok, make_adamw,
                                 reference_head_loss, resolve_switch, skip_update_if_not_finite)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_head_loss_equals_full_logits_loss_and_gradient(dtype, tol):
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 11, 16, 301  # 11 rows in chunks of 4: a partial last chunk
    weight = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    h0 = torch.randn(n, d, generator=g)
    h_ref = h0.clone().to(dtype).requires_grad_()
    ref = reference_head_loss(h_ref, weight, targets)
    ref.backward()
    h = h0.clone().to(dtype).requires_grad_()
    loss = chunked_head_loss(h, weight, targets, rows=4)
    (loss * 2).backward()  # the upstream gradient is applied
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, ref.float(), rtol=tol, atol=tol)
    assert torch.allclose(h.grad.float(), 2 * h_ref.grad.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="frozen"):
        chunked_head_loss(h, weight.clone().requires_grad_(), targets)
    assert chunk_rows(250_880) == 534  # 512 MiB of fp32 logits per chunk


def test_switches_and_loss_buffer():
    assert resolve_switch(None, torch.device("cpu")) is False
    assert resolve_switch(None, torch.device("cuda", 0)) is True
    assert resolve_switch(True, torch.device("cpu")) is True
    buf = LossBuffer()
    buf.add(1, torch.tensor(2.5), torch.tensor(0.5))
    buf.add(2, torch.tensor(float("nan")), None)
    out = buf.flush()
    assert out[0] == (1, 2.5, 0.5) and out[1][0] == 2 and out[1][2] is None and out[1][1] != out[1][1]
    assert buf.flush() == []


def test_fused_adamw_skips_a_non_finite_step_without_the_host():
    w = torch.nn.Parameter(torch.ones(3))
    opt = make_adamw([w], 0.1, 0.0, fused=True)
    w.grad = torch.ones(3)
    assert skip_update_if_not_finite(opt, torch.tensor(float("inf")), torch.tensor(1.0))
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))  # skipped
    assert skip_update_if_not_finite(opt, torch.tensor(1.0), torch.tensor(1.0))
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))
    assert not skip_update_if_not_finite(make_adamw([w], 0.1, 0.0, fused=False), torch.tensor(1.0), None)


def test_compile_forward_falls_back_to_eager(monkeypatch):
    lin = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    want = lin(x)

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C compiler\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    compile_forward(lin)
    assert torch.equal(lin(x), want) and compile_ok(lin) is False
    assert torch.equal(lin(x), want)


def test_compile_forward_compiles(one_thread):
    lin = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    want = lin(x)
    compile_forward(lin, backend="eager")  # dynamo's graph capture without a C compiler
    assert torch.allclose(lin(x), want) and compile_ok(lin) is True


def _run(tmp_path, name, **train_kw):
    cfg = tiny_cfg(tmp_path, name=name, precision="fp32", epochs=2, batch_size=3, **train_kw)
    res = train(cfg, progress=False)
    log = [json.loads(ln) for ln in open(res.output_dir / "train_log.jsonl")]
    params = {n: p.detach().clone() for n, p in res.model.named_parameters() if "lora_" in n}
    summary = json.loads((res.output_dir / "train_summary.json").read_text())
    return log, params, summary


def test_speed_paths_train_like_the_plain_path(tmp_path, one_thread):
    """device_loss + fused AdamW + chunked loss (all on, on the CPU) against the plain path: the same losses,
    gradient norms and trained weights, to rounding."""
    plain_log, plain, s0 = _run(tmp_path, "plain", device_loss=False, fused_adamw=False)
    fast_log, fast, s1 = _run(tmp_path, "fast", device_loss=True, fused_adamw=True, chunked_loss=True, log_every=2)
    assert s0["speed"] == {"device_loss": False, "fused_adamw": False, "padding_free": False, "compile": None}
    assert s1["speed"]["device_loss"] and s1["speed"]["fused_adamw"] and s1["lm_head_loss"] == "chunked"
    assert s0["lm_head_loss"] == "fused"  # the CPU's fused head: the chunked loss replaced it
    by_step = {r["step"]: r for r in plain_log}
    assert [r["step"] for r in fast_log] == [2, 4, 6]  # log_every 2 over 6 steps
    for r in fast_log:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-4)
        assert r["grad_norm"] == pytest.approx(by_step[r["step"]]["grad_norm"], rel=1e-3)
        assert isinstance(r["grad_norm"], float)
    assert s1["final_loss"] == pytest.approx(s0["final_loss"], rel=1e-4)
    assert plain.keys() == fast.keys() and plain
    for n in plain:
        assert torch.allclose(plain[n], fast[n], atol=1e-4), n


def test_device_loss_still_refuses_a_non_finite_step(tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, name="nan", precision="fp32", learning_rate=1e9, max_grad_norm=None, epochs=4,
                   batch_size=3, device_loss=True, fused_adamw=True, log_every=4)
    with pytest.raises(ClmtuneError, match=r"training stopped at step \d+: the loss is (nan|inf)"):
        train(cfg, progress=False)


def test_chunked_loss_memory_line(tmp_path, one_thread):
    """train.chunked_loss: the estimate's LM-head line is one chunk of logits, not the CPU fused loop's block."""
    from clmtune.train.speed import chunked_head_bytes

    _, _, s = _run(tmp_path, "chunk_mem", chunked_loss=True)
    est = s["memory"]["estimate"]
    assert s["lm_head_loss"] == "chunked" and est["lm_head"] > 0
    w = torch.empty(50265, 64)  # tiny-opt's fp32 head: vocabulary x hidden
    # the line is chunked_head_bytes of the supervised positions of the largest batch (3 rows of a few label tokens)
    assert any(chunked_head_bytes(n, w) == est["lm_head"] for n in range(3, 30))


@pytest.mark.parametrize("model", ["builtin:tiny-llama"])
def test_padding_free_trains_like_padded_batches(tmp_path, one_thread, model):
    """train.padding_free: each batch's rows in one row, positions restarting, attention within each row (here
    SDPA with transformers' packed-sequence mask): the same losses and trained weights as left-padded batches."""
    def run(name, **kw):
        cfg = tiny_cfg(tmp_path, name=name, model=model, precision="fp32", epochs=2, batch_size=3,
                       peft={"lora_dropout": 0.0}, **kw)
        res = train(cfg, progress=False)
        log = [json.loads(ln) for ln in open(res.output_dir / "train_log.jsonl")]
        summary = json.loads((res.output_dir / "train_summary.json").read_text())
        return log, {n: p.detach().clone() for n, p in res.model.named_parameters() if "lora_" in n}, summary

    padded_log, padded, s0 = run("padded")
    packed_log, packed, s1 = run("packed", padding_free=True)
    assert s1["speed"]["padding_free"] and not s0["speed"]["padding_free"]
    assert [r["step"] for r in packed_log] == [r["step"] for r in padded_log]
    for a, b in zip(padded_log, packed_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # real tokens, no pads, in both (the log's rounded tokens/s x seconds: to rounding)
    assert sum(r["tokens_per_s"] * r["seconds"] for r in packed_log) == pytest.approx(
        sum(r["tokens_per_s"] * r["seconds"] for r in padded_log), rel=2e-2)
    for n in padded:
        assert torch.allclose(padded[n], packed[n], atol=1e-4), n


def test_pack_rows_and_refusal(tmp_path, one_thread):
    from clmtune.train.speed import pack_rows

    batch = pack_rows([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
                      -100)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # no row learns the next row's first token
    cfg = tiny_cfg(tmp_path, name="opt", precision="fp32", padding_free=True)  # OPT: positions from the mask
    with pytest.raises(ClmtuneError, match="train.padding_free is on, but model type 'opt'"):
        train(cfg, progress=False)
