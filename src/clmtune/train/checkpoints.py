"""Checkpoints of a training run: ``RUN/checkpoints/step-NNNNNN`` with the trainable weights, the optimizer, the
scheduler, the RNG states and the position in the data, written atomically (temporary folder, then rename).

Split out of the train loop (``clmtune.train``) when that module passed ~600 lines.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from clmtune.config import RunConfig
from clmtune.errors import ClmtuneError
from clmtune.fsutil import os_errors, tmp_sibling
from clmtune.models import unwrap
from clmtune.run import ADAPTER, RunDir

log = logging.getLogger("clmtune")

STATE_FILE = "trainer_state.json"  # written last inside a checkpoint
_CKPT_RE = re.compile(r"^step-(\d+)$")
# config keys that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"train.output_dir", "train.overwrite", "train.save_steps", "train.save_total_limit",
                      "train.log_every", "train.gradient_checkpointing", "eval.batch_size", "eval.method", "eval.normalize_by_length"}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (a folder counts only once its state file is there)."""
    folder = RunDir(run_dir).checkpoints
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a truncated safetensors file, a broken state or optimizer file), or
    None. Cheap: safetensors headers only, and the zip CRCs of the ``torch.save`` files."""
    import zipfile

    from safetensors import safe_open

    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            return f"{STATE_FILE} has no step"
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    weights = [p for p in (ckpt / "adapter" / "adapter_model.safetensors", ckpt / "model.safetensors") if p.exists()]
    if not weights:
        return "it holds no weights"
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001  SafetensorError and OSError both mean "cannot be read"
            return f"{f.relative_to(ckpt)} is corrupt ({str(exc).splitlines()[0][:80]})"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        f = ckpt / name
        if not f.exists():
            continue  # DeepSpeed checkpoints hold weights only
        try:
            with zipfile.ZipFile(f) as z:
                if (bad := z.testzip()) is not None:
                    return f"{name} is corrupt ({bad} fails its CRC)"
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{name} is corrupt ({exc})"
    return None


def _newest_valid(found: list[Path]) -> Path | None:
    """The newest checkpoint that can be resumed from; each corrupt newer one is skipped with a warning."""
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s; using the previous one", ckpt, problem)
    return None


def resolve_resume(out: Path, resume: str) -> Path:
    """``latest`` -> newest valid checkpoint of ``out``; a checkpoint folder -> itself; a run folder -> its newest
    valid one."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ClmtuneError(f"--resume: {out} has no checkpoint to resume from (looked for "
                               f"{RunDir(out).checkpoints}/step-*/{STATE_FILE}); set train.save_steps to write checkpoints")
        if (ckpt := _newest_valid(found)) is None:
            raise ClmtuneError(f"--resume: every checkpoint of {out} is corrupt ({', '.join(p.name for p in found)})"
                               "; start over with --overwrite")
        return ckpt
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file() and _CKPT_RE.match(path.name):
        if problem := checkpoint_problem(path):
            raise ClmtuneError(f"--resume {resume}: the checkpoint is corrupt ({problem}); pass --resume alone to "
                               "use the newest valid one")
        return path
    if list_checkpoints(path):
        if (ckpt := _newest_valid(list_checkpoints(path))) is not None:
            return ckpt
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


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model, accelerator) -> dict[str, torch.Tensor]:
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


def save_checkpoint_weights(folder: Path, model, accelerator, is_peft: bool) -> Path:
    """The trainable weights alone (checkpoint format) into ``folder``, atomically: a hidden sibling renamed into
    place. A collective call under DeepSpeed: every process must make it."""
    weights = trainable_state(model, accelerator)
    if accelerator.is_main_process:
        tmp = tmp_sibling(folder)
        _write_weights(tmp, accelerator.unwrap_model(model), weights, is_peft)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def load_checkpoint_weights(folder: Path, model, is_peft: bool) -> None:
    """Load what ``save_checkpoint_weights`` (or ``save_checkpoint``) wrote back into the (prepared) model."""
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
    from safetensors.torch import save_model

    weights = trainable_state(model, accelerator)  # collective under DeepSpeed
    final = RunDir(out).checkpoints / f"step-{state['step']:06d}"
    if not accelerator.is_main_process:
        return final
    tmp = tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    trained = sum(p.numel() * p.element_size() for p in unwrapped.parameters() if p.requires_grad)
    try:  # a full disk: one line naming the file; the half-written folder goes, the previous checkpoint stays
        with os_errors(tmp, 3 * trained):  # weights + AdamW's two moments
            if is_peft:  # peft format, so a checkpoint can also be evaluated like a finished adapter
                unwrapped.save_pretrained(tmp / ADAPTER, state_dict=weights, safe_serialization=True)
            else:  # full fine-tuning: every weight; save_model stores tied weights (lm_head = embeddings) once
                save_model(unwrapped, str(tmp / "model.safetensors"))
            if accelerator.state.deepspeed_plugin is None:  # DeepSpeed shards optimizer state: weights only
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(_rng_state(), tmp / "rng_state.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one file system: `final` is either absent or complete
    if keep is not None:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(folder: Path, model, is_peft: bool) -> None:
    """Load a run's saved ``adapter/`` (peft) or ``model/`` (``save_pretrained``) into ``model``: used when a run
    killed after saving its weights is finished by ``--resume``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    unwrapped = unwrap(model)
    if is_peft:
        set_peft_model_state_dict(unwrapped, load_file(folder / "adapter_model.safetensors"))
        return
    # save_pretrained leaves out tied weights (lm_head = embeddings): only unexpected keys are an error
    unexpected = unwrapped.load_state_dict(load_file(folder / "model.safetensors"), strict=False).unexpected_keys
    if unexpected:
        raise ClmtuneError(f"{folder} does not match the model (unexpected {sorted(unexpected)[:3]}); was it written "
                           "by another config?")


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, is_peft: bool) -> dict:
    """Load weights, optimizer and scheduler from ``ckpt`` into the (prepared) objects; return its state.

    ``torch.load(weights_only=True)``: optimizer/scheduler/RNG files are tensors and plain containers only.
    """
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    load_checkpoint_weights(ckpt, model, is_peft)
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


def check_same_config(cfg: RunConfig, saved: dict, ckpt: Path) -> None:
    now, then, default = _flat(cfg.to_dict()), _flat(saved), _flat(RunConfig().to_dict())
    # a key newer than the checkpoint (absent there) is unchanged when it has its default value
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in _RESUMABLE_CHANGES
                  and not (k not in then and now.get(k) == default.get(k)))
    if diff:
        raise ClmtuneError(f"cannot resume from {ckpt}: the config differs in {', '.join(diff)} (checkpoint has "
                           f"{', '.join(f'{k}={then.get(k)!r}' for k in diff[:3])}); resume with the same config")


# ----------------------------------------------------------------------------------------------------------------
# Training


def prepare_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    run = RunDir(path)
    if run.is_finished():
        if resume:
            raise ClmtuneError(f"{path} already holds a finished run; nothing to resume (pass --overwrite without "
                               "--resume to train again)")
        if not overwrite:
            raise ClmtuneError(f"{path} already holds a finished run; choose another train.output_dir or pass "
                               "--overwrite (or --train.overwrite true)")
    if overwrite and not resume:
        run.clear_outputs()
    elif not resume and (list_checkpoints(path) or run.has_weights()):
        what = "checkpoints" if list_checkpoints(path) else "the saved weights"
        raise ClmtuneError(f"{path} holds {what} of an unfinished run; continue it with --resume, or start over "
                           "with --overwrite")
    path.mkdir(parents=True, exist_ok=True)
