"""The checks that need a CUDA GPU, as one short script (a few minutes on one GPU):

    python bench/gpu_check.py --out DIR        # every check; DIR/gpu_check.json + one folder per check

  zero2        DeepSpeed ZeRO-2 (configs/deepspeed/zero2.json) trains a few steps, saves; the adapter loads with
               plain peft, is non-empty, and equals the trained weights gathered from the engine
  zero3        the same with ZeRO-3 + CPU offload (configs/deepspeed/zero3_offload.json): the case where users
               report empty adapters against peft
  fsdp         FSDP2 through `accelerate launch --config_file configs/accelerate/fsdp.yaml`: trains, saves, reloads
  resume       interrupted + resumed vs uninterrupted run on CUDA, with train.deterministic false and true:
               the largest difference of the LoRA weights (issue 17 item 5: it was up to 0.036)
  qlora        model.load_in_4bit (bitsandbytes) trains and saves an adapter that loads on an fp32 base
  memory       clmtune's memory estimate vs torch.cuda.max_memory_allocated, for every run above
  padding      left-padded batches under SDPA (the step-68 NaN of the head-dim-64 fine-tunings on an H200): loss
               and gradient norm finite, with transformers' 2D mask and with clmtune's self-attending 4D mask
               (``models.self_attending_mask``), for head dims 64 and 36, lengths 191/192/256, fp32 and bf16; then
               the ChnSentiCorp fine-tuning of a 6 x 320 GPT-2 (head dim 64) for 120 steps with the mask off and on

A check whose package is missing (deepspeed, bitsandbytes) is reported as skipped with the reason, not failed.
Each training check runs in its own process (torchrun / accelerate launch); workers are this file with --worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))


def tiny_config(out: Path, **train) -> dict:
    return {"data": {"source": "builtin:raft/twitter_complaints", "eval_fraction": 0.0, "max_length": 64},
            "model": {"name_or_path": "builtin:tiny-opt"},
            "peft": {"method": "lora", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
            "train": {"output_dir": str(out), "overwrite": True, "epochs": 2, "batch_size": 4, "learning_rate": 1e-2,
                      "seed": 42, **train}}


def _adapter_vs_trained(out: Path, trained: dict, from_file: bool = False) -> dict:
    """Load the saved adapter with plain peft on an fp32 base; compare with the weights taken from the engine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clmtune.models import builtin_model_path

    if from_file:  # under ZeRO-3 a model built in this process is partitioned again: read the saved file itself
        from safetensors.torch import load_file

        loaded = {n: p.float() for n, p in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_path("tiny-opt")),
                                          str(out / "adapter"))
        loaded = {n.replace(".default", ""): p.detach().float().cpu() for n, p in model.named_parameters()
                  if "lora_" in n}
    trained = {n.replace(".default", ""): t.float().cpu() for n, t in trained.items()}
    empty = [n for n, p in loaded.items() if p.numel() == 0]
    diff = max((float((loaded[n] - trained[n]).abs().max()) for n in loaded if n in trained and
                loaded[n].shape == trained[n].shape), default=None)
    return {"adapter_tensors": len(loaded), "empty_tensors": empty, "matched": len(set(loaded) & set(trained)),
            "lora_B_nonzero": any(float(p.abs().sum()) > 0 for n, p in loaded.items() if "lora_B" in n),
            "max_abs_diff_vs_trained": diff,
            "ok": bool(loaded) and not empty and diff is not None and diff < 1e-2 and
            len(set(loaded) & set(trained)) == len(loaded) and
            any(float(p.abs().sum()) > 0 for n, p in loaded.items() if "lora_B" in n) and
            all(torch.isfinite(p).all() for p in loaded.values())}


def worker_train(kind: str, out: Path) -> dict:
    """Under torchrun / accelerate launch: train, take the trained LoRA weights from the engine, compare."""
    import torch

    from clmtune.config import from_dict
    from clmtune.train import TrainRecipe

    extra = {"max_steps": 6, "precision": "bf16"}
    if kind == "zero2":
        extra["deepspeed"] = str(REPO / "configs/deepspeed/zero2.json")
    elif kind == "zero3":
        extra["deepspeed"] = str(REPO / "configs/deepspeed/zero3_offload.json")
    recipe = TrainRecipe(from_dict(tiny_config(out, **extra)).validate(), progress=False).setup().fit()
    engine = recipe.model
    named = [(n, p) for n, p in recipe.accelerator.unwrap_model(engine).named_parameters() if p.requires_grad]
    if kind == "zero3":  # partitioned: gather the full tensors first
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            trained = {n: p.detach().clone().cpu() for n, p in named}
    else:
        trained = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu() for n, p in named}
    result = recipe.save()
    if not recipe.main:
        return {}
    summary = json.loads((out / "train_summary.json").read_text())
    return {"steps": result.steps, "loss": [result.first_loss, result.final_loss], "memory": summary.get("memory"),
            **_adapter_vs_trained(out, trained, from_file=kind == "zero3")}


def worker_resume(out: Path, deterministic: bool) -> dict:
    import torch
    from safetensors.torch import load_file

    import clmtune.train.step as train_mod  # where train_window looks the loss up
    from clmtune.config import from_dict
    from clmtune.train import train

    def cfg(name):
        return from_dict(tiny_config(out / name, epochs=3, save_steps=4, deterministic=deterministic,
                                     precision="fp32")).validate()

    straight = train(cfg("straight"), progress=False)
    real, calls = train_mod.causal_lm_loss, {"n": 0}

    def crash(logits, labels, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(logits, labels, **kw)

    train_mod.causal_lm_loss = crash
    try:
        train(cfg("crashed"), progress=False)
    except RuntimeError:
        pass
    finally:
        train_mod.causal_lm_loss = real
    resumed = train(cfg("crashed"), progress=False, resume="latest")
    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return {"deterministic": deterministic, "steps": resumed.steps, "resumed_from": str(resumed.resumed_from),
            "max_abs_diff": diff, "bit_identical": all(torch.equal(a[k], b[k]) for k in a)}


def worker_qlora(out: Path) -> dict:
    from clmtune.config import from_dict
    from clmtune.train import train

    cfg = tiny_config(out, max_steps=6)
    cfg["model"].update({"load_in_4bit": True, "dtype": "bf16"})
    result = train(from_dict(cfg).validate(), progress=False)
    checked = _adapter_vs_trained(out, {n: p for n, p in result.model.named_parameters() if p.requires_grad})
    return {"loss": [result.first_loss, result.final_loss], **checked}


def worker_padding(out: Path, device: str = "cuda", steps: int = 120) -> dict:
    """Does a fully masked query row (a left pad) give NaN under this GPU's SDPA, and does the 4D mask prevent it?"""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import clmtune.models.peft_methods as pm
    from clmtune.config import from_dict
    from clmtune.models import builtin_model_path, forward_inputs
    from clmtune.tasks.encoding import collate
    from clmtune.train import causal_lm_loss, train

    res: dict = {"kernels": []}
    tok_dir = builtin_model_path("gpt2-zh-small")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]  # the shipped tokenizer's 7,996
    for layers, width, heads in ((6, 320, 5), (8, 288, 8)):  # head dim 64 (the NaN runs) and 36 (the shipped one)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=width, n_layer=layers, n_head=heads)
        for impl in ("sdpa", "eager"):
            model = GPT2LMHeadModel._from_config(config, attn_implementation=impl).to(device)
            for length in (191, 192, 256):
                g = torch.Generator().manual_seed(length)
                rows = [torch.randint(100, vocab, (length - (2 if i % 3 == 0 else 0),), generator=g).tolist()
                        for i in range(16)]
                batch = collate([{"input_ids": r, "labels": r} for r in rows], 0)
                labels = batch.pop("labels").to(device)
                batch = {k: v.to(device) for k, v in batch.items()}
                for self_attending in ((False, True) if impl == "sdpa" else (False,)):
                    for dtype in ("fp32", "bf16"):
                        pm.SELF_ATTENDING_PADS = self_attending
                        model.zero_grad(set_to_none=True)
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                            loss = causal_lm_loss(model(**forward_inputs(model, batch, backward=True)).logits, labels)
                        loss.backward()
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
                        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                            # evaluation and generation: forward only, transformers' 2D mask, in eval mode
                            real = batch["attention_mask"].bool()
                            finite = bool(torch.isfinite(model.eval()(**batch).logits[real]).all())
                            model.train()
                        res["kernels"].append({"head_dim": width // heads, "attn": impl, "length": length,
                                               "self_attending_mask": self_attending, "dtype": dtype,
                                               "loss": float(loss), "grad_norm": float(norm),
                                               "forward_2d_finite": finite})
                        print(json.dumps(res["kernels"][-1]), flush=True)
    pm.SELF_ATTENDING_PADS = None  # the default: on for GPUs
    bad = [k for k in res["kernels"] if not (math.isfinite(k["loss"]) and math.isfinite(k["grad_norm"])
                                             and k["forward_2d_finite"])]
    res["kernel_nan_cases"] = bad
    # the real thing: clmtune's ChnSentiCorp config on a random 6 x 320 GPT-2 (head dim 64), mask off then default
    folder = out / "gpt2_6x320"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=320, n_layer=6, n_head=5)).save_pretrained(
        folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tok_dir / f).read_bytes())
    import yaml

    base = yaml.safe_load((REPO / "configs/chnsenticorp_classify.yaml").read_text(encoding="utf-8"))
    res["train"] = {}
    for self_attending in (False, None if device != "cpu" else True):  # off, then the default (on for a GPU)
        pm.SELF_ATTENDING_PADS = self_attending
        cfg = {**base, "model": {"name_or_path": str(folder)}, "eval": {"method": "rank"}}
        cfg["train"] = {**base["train"], "output_dir": str(out / f"ft_{self_attending}"), "overwrite": True,
                        "max_steps": steps, "learning_rate": 2e-3, "save_steps": None, "eval_steps": None}
        t0 = time.perf_counter()
        try:
            r = train(from_dict(cfg).validate(), progress=False)
            res["train"][f"self_attending_{self_attending}"] = {"steps": r.steps, "loss": [r.first_loss, r.final_loss]}
        except Exception as exc:  # noqa: BLE001 - the NaN stop is what this looks for
            res["train"][f"self_attending_{self_attending}"] = {"error": f"{type(exc).__name__}: {exc}"}
        res["train"][f"self_attending_{self_attending}"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res["train"]), flush=True)
    pm.SELF_ATTENDING_PADS = None  # the default: on for GPUs
    res["ok"] = not [k for k in bad if k["self_attending_mask"] or k["attn"] == "eager"] and \
        "error" not in res["train"][f"self_attending_{None if device != 'cpu' else True}"]
    return res


def run_worker(args) -> None:
    import torch

    out = Path(args.worker_out)
    try:
        if args.worker in ("zero2", "zero3", "fsdp"):
            res = worker_train(args.worker, out)
        elif args.worker == "padding":
            res = worker_padding(out, "cuda" if torch.cuda.is_available() else "cpu", int(args.steps))
        elif args.worker == "resume":
            res = {"nondeterministic": worker_resume(out / "plain", False),
                   "deterministic": worker_resume(out / "det", True)}
        else:
            res = worker_qlora(out)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    if int(os.environ.get("RANK", "0")) == 0:
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        (out / "result.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--checks", default="padding,resume,fsdp,qlora,zero2,zero3")
    ap.add_argument("--steps", default="120", help="padding: fine-tuning steps (CPU smoke test: a few)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds: start no check after this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)

    import torch

    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "deepspeed": importlib.util.find_spec("deepspeed") is not None,
              "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None, "checks": {}}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA GPU visible to torch: nothing checked"
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        raise SystemExit(report["error"])
    clmtune = [sys.executable, __file__, "--worker"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
                "--worker"]
    commands = {
        "zero2": (torchrun + ["zero2"], "deepspeed"),
        "zero3": (torchrun + ["zero3"], "deepspeed"),
        "fsdp": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", __file__, "--worker", "fsdp"],
                 None),
        "resume": (clmtune + ["resume"], None),
        "padding": (clmtune + ["padding", "--steps", args.steps], None),
        "qlora": (clmtune + ["qlora"], "bitsandbytes"),
    }
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in args.checks.split(","):
        cmd, needs = commands[name]
        if needs and not report[needs]:
            report["checks"][name] = {"skipped": f"{needs} is not installed (pip install {needs})"}
            continue
        where = out / name
        t0 = time.perf_counter()
        left = args.deadline - (time.perf_counter() - started)
        if left < 20:
            report["checks"][name] = {"skipped": f"--deadline {args.deadline:.0f} s reached"}
            continue
        try:
            proc = subprocess.run(cmd + ["--worker-out", str(where)], env=env, capture_output=True, text=True,
                                  timeout=min(300.0, left))
            tail = proc.stderr[-3000:]
            code = proc.returncode
        except subprocess.TimeoutExpired as exc:
            tail, code = (exc.stderr or b"")[-3000:], f"killed after {exc.timeout:.0f} s"
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        res = json.loads((where / "result.json").read_text()) if (where / "result.json").is_file() else \
            {"ok": False, "error": f"exit {code}", "stderr": tail}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        report["checks"][name] = res
        print(f"{name}: {json.dumps({k: v for k, v in res.items() if k not in ('trace', 'stderr')}, default=str)}",
              flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"written {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
