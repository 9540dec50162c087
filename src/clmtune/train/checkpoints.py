"""Checkpoints of a training run: ``RUN/checkpoints/step-NNNNNN`` with the trainable weights, the optimizer, the
scheduler, the RNG states and the position in the data, written atomically (temporary folder, then rename).

Split out of the train loop (``clmtune.train``) when that module passed ~600 lines.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from clmtune.config import RunConfig
from clmtune.errors import ClmtuneError
from clmtune.models import unwrap
from clmtune.run import ADAPTER, RunDir

STATE_FILE = "trainer_state.json"  # written last inside a checkpoint
_CKPT_RE = re.compile(r"^step-(\d+)$")
# config keys that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"train.output_dir", "train.overwrite", "train.save_steps", "train.save_total_limit",
                      "train.log_every", "eval.batch_size", "eval.method", "eval.normalize_by_length"}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (a folder counts only once its state file is there)."""
    folder = RunDir(run_dir).checkpoints
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(out: Path, resume: str) -> Path:
    """``latest`` -> newest checkpoint of ``out``; a checkpoint folder -> itself; a run folder -> its newest."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ClmtuneError(f"--resume: {out} has no checkpoint to resume from (looked for "
                               f"{RunDir(out).checkpoints}/step-*/{STATE_FILE}); set train.save_steps to write checkpoints")
        return found[-1]
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file() and _CKPT_RE.match(path.name):
        return path
    if list_checkpoints(path):
        return list_checkpoints(path)[-1]
    raise ClmtuneError(f"--resume {resume}: not a checkpoint (a checkpoint is a folder step-NNNNNN holding "
                       f"{STATE_FILE}, e.g. {RunDir(out).checkpoints}/step-000010); pass --resume alone for the latest one")


def _rng_state() -> dict:
    import numpy as np

    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store it as a list
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model, accelerator) -> dict[str, torch.Tensor]:
    """State dict to save: the adapter (peft filters it) or, for full fine-tuning, every weight.

    ``accelerator.get_state_dict`` gathers ZeRO-3 shards (without it, DeepSpeed ZeRO-3 saves empty adapters).
    It is a collective call: every process must make it.
    """
    return accelerator.get_state_dict(model)


def _write_weights(folder: Path, unwrapped, weights: dict, is_peft: bool) -> None:
    """Trainable weights into a fresh ``folder``: peft format (so a checkpoint can also be evaluated like a finished
    adapter) or, for full fine-tuning, every weight (``save_model`` stores tied weights once)."""
    from safetensors.torch import save_model

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if is_peft:
        unwrapped.save_pretrained(folder / ADAPTER, state_dict=weights, safe_serialization=True)
    else:
        save_model(unwrapped, str(folder / "model.safetensors"))


def save_weights(folder: Path, model, accelerator, is_peft: bool) -> Path:
    """The trainable weights alone (checkpoint format) into ``folder``, atomically: a hidden sibling renamed into
    place. A collective call under DeepSpeed: every process must make it."""
    weights = _trainable_state(model, accelerator)
    if accelerator.is_main_process:
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        _write_weights(tmp, accelerator.unwrap_model(model), weights, is_peft)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def load_weights(folder: Path, model, is_peft: bool) -> None:
    """Load what ``save_weights`` (or a checkpoint) wrote back into the (prepared) model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, load_model

    unwrapped = unwrap(model)
    if is_peft:
        set_peft_model_state_dict(unwrapped, load_file(folder / ADAPTER / "adapter_model.safetensors"))
        return
    missing, unexpected = load_model(unwrapped, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ClmtuneError(f"{folder} does not match the model (missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}); was it written by another config?")


def save_checkpoint(out: Path, model, optimizer, scheduler, accelerator, state: dict, keep: int | None,
                    is_peft: bool) -> Path:
    """Write ``out/checkpoints/step-N`` atomically (temp folder + rename); delete all but the last ``keep``."""
    weights = _trainable_state(model, accelerator)  # collective under DeepSpeed
    final = RunDir(out).checkpoints / f"step-{state['step']:06d}"
    if not accelerator.is_main_process:
        return final
    tmp = final.parent / f".tmp-step-{state['step']:06d}-{os.getpid()}"
    _write_weights(tmp, accelerator.unwrap_model(model), weights, is_peft)
    if accelerator.state.deepspeed_plugin is None:  # DeepSpeed shards optimizer state: weights-only checkpoint
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one file system: `final` is either absent or complete
    if keep is not None:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, is_peft: bool) -> dict:
    """Load weights, optimizer and scheduler from ``ckpt`` into the (prepared) objects; return its state.

    ``torch.load(weights_only=True)``: optimizer/scheduler/RNG files are tensors and plain containers only.
    """
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    load_weights(ckpt, model, is_peft)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state["rng"] = torch.load(ckpt / "rng_state.pt", weights_only=True)
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_config(cfg: RunConfig, saved: dict, ckpt: Path) -> None:
    now, then = _flat(cfg.to_dict()), _flat(saved)
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ClmtuneError(f"cannot resume from {ckpt}: the config differs in {', '.join(diff)} (checkpoint has "
                           f"{', '.join(f'{k}={then.get(k)!r}' for k in diff[:3])}); resume with the same config")


# ----------------------------------------------------------------------------------------------------------------
# Training
