"""Train stage: fine-tune a causal LM with a peft adapter (or every weight) on classification-as-generation data.

Engine: a plain ``accelerate`` loop, as in peft's causal-LM example, rather than ``transformers.Trainer``:
the same code runs on one CPU, under ``accelerate launch``/``torchrun`` (DDP, gloo on CPU) and with DeepSpeed,
and we keep control of what the loss is computed on (only the supervised positions) and of what is saved when.

Speed (issue 7, measured by bench/bench_train.py): batches are length-grouped (``EpochSampler``) and padded
per batch; the LM head runs only on the positions that predict a label (a boolean ``logits_to_keep`` mask: for
classification ~3 positions per row instead of ~40..256, and the head is the largest matmul for big
vocabularies); the loss is a sum over label tokens divided by the label tokens of the whole optimizer step (all
accumulated batches, all processes); bf16 keeps the frozen matmul weights in bf16.

Checkpoints (``train.save_steps``) live in ``RUN/checkpoints/step-NNNNNN`` and hold the trainable weights, the
optimizer, the scheduler, the RNG states and the position in the data (epoch, batches consumed). A checkpoint is
written into a hidden temporary folder and renamed into place when complete, so a killed process never leaves a
folder that looks like a checkpoint but is not. Resuming rebuilds the same data order (it is a pure function of
seed and epoch, see ``EpochSampler``), skips the consumed batches and restores the RNG states, so a resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clmtune.config import RunConfig, save_config
from clmtune.data import IGNORE_INDEX, collate, prepare_data
from clmtune.defaults import resolve_defaults
from clmtune.errors import ClmtuneError
from clmtune.models import (apply_peft, check_tokenizer_fits, context_length, forward_inputs, load_model,
                             load_tokenizer, peft_type, resolve_model_path)

from clmtune.train.checkpoints import (CHECKPOINTS, STATE_FILE, _check_same_config, _set_rng_state,
                                       _trainable_state, list_checkpoints, load_checkpoint, resolve_resume,
                                       save_checkpoint)

log = logging.getLogger("clmtune")

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    has_eval_split: bool
    resumed_from: Path | None = None
    model: object = None
    """The trained (unwrapped) model, for callers that go on in the same process."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over supervised positions: their mean, or (``reduction="sum"``) their sum.

    logits: (B, L, V); labels: (B, T). The two are aligned on the right: L < T when the LM head only ran on the
    last positions, L > T when peft prepended virtual tokens (prompt tuning, p-tuning: L = n_virtual + T).
    Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:] (of the same last T).
    logits (N, V) (the LM head ran only on the supervised positions, see ``head_positions``): row k scores the
    k-th supervised label of labels[:, 1:] in row-major order.
    """
    if logits.dim() == 2:
        targets = labels[:, 1:]
        targets = targets[targets != IGNORE_INDEX]  # (N,), row-major like hidden_states[mask]
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    n = min(logits.shape[1], labels.shape[1])
    logits, labels = logits[:, -n:], labels[:, -n:]
    shift_logits = logits[:, :-1].float()  # (B, n-1, V); fp32 for a stable log-softmax under bf16 autocast
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def supervised_tokens(labels: torch.Tensor) -> int:
    """Number of positions that carry loss: labels (B, T) -> count of labels[:, 1:] != IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions the LM head must run on so that every supervised label is predicted.

    labels (B, T), left-padded: label t is predicted by position t-1, so with j the first column where any row
    is supervised, the last T - j + 1 positions suffice (a classification batch: label words + end + 1, ~4 of
    T ~ 40..256). Returns T (every position) when column 0 is supervised (``lm`` rows).
    """
    columns = (labels != IGNORE_INDEX).any(0)  # (T,)
    if not bool(columns.any()):
        return 1
    first = int(columns.float().argmax())
    return int(labels.shape[1]) - max(first - 1, 0)


def head_trim_support(model) -> tuple[str | None, str | None]:
    """How the LM head can be limited to the positions that need it: ``("mask", None)`` when the model slices its
    hidden states with transformers' ``slice_logits_to_keep`` (a boolean (B, L) mask keeps exactly the supervised
    positions), ``("last", None)`` when it takes an integer ``logits_to_keep``, ``(None, reason)`` when it cannot
    (then training computes full logits)."""
    import sys

    unwrapped = getattr(model, "module", model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None, f"{type(base).__name__}.forward has no logits_to_keep argument"
    if getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None:
        return "mask", None
    return "last", None


def virtual_tokens(model) -> int:
    """Positions peft puts in front of the input (prompt tuning, p-tuning); prefix tuning's go to the KV cache."""
    unwrapped = getattr(model, "module", model)
    if peft_type(unwrapped) in ("PROMPT_TUNING", "P_TUNING"):
        return int(unwrapped.active_peft_config.num_virtual_tokens)
    return 0


def head_positions(labels: torch.Tensor, mode: str, n_virtual: int = 0) -> torch.Tensor | int:
    """``logits_to_keep`` for a left-padded batch. ``last``: the int K of ``logits_to_keep(labels)``.
    ``mask``: a bool (B, n_virtual + T) mask of the positions that predict a label (position t predicts label
    t+1); the model then returns (N, V) logits, N = supervised tokens, and the LM head (a d x V matmul, the
    largest one for big vocabularies) runs on nothing else. The mask makes transformers gather the hidden states
    into one contiguous (N, d) tensor; an int K slices a non-contiguous (B, K, d) view, which F.linear turns into a
    batched matmul against the weight broadcast B times: measured 3x slower than one (N, d) x (d, V) mm."""
    if mode == "last":
        return logits_to_keep(labels)
    mask = torch.zeros(labels.shape[0], n_virtual + labels.shape[1], dtype=torch.bool, device=labels.device)
    mask[:, n_virtual:-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def bf16_unsupported_reason() -> str | None:
    """``None`` when this machine can train with bf16 autocast at speed, else why not (a one-line reason).

    CUDA: the GPU must support bf16 (Ampere or newer). CPU: oneDNN must have bf16 kernels (AVX512-BF16/AMX, or
    AVX512 emulation); without them bf16 matmuls run through slow reference code, slower than fp32.
    """
    if torch.cuda.is_available():
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support (needs Ampere or newer)"
    try:
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        ok = False
    if not ok:
        return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bf16 matmuls in oneDNN "
                "(needs AVX512-BF16, AMX or at least AVX512)")
    return None


def run_is_finished(path: Path) -> bool:
    return (path / "adapter" / "adapter_config.json").is_file() or (path / "model" / "config.json").is_file()


def prepare_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    if run_is_finished(path):
        if resume:
            raise ClmtuneError(f"{path} already holds a finished run; nothing to resume (pass --overwrite without "
                               "--resume to train again)")
        if not overwrite:
            raise ClmtuneError(f"{path} already holds a finished run; choose another train.output_dir or pass "
                               "--overwrite (or --train.overwrite true)")
    if overwrite and not resume:
        for name in ("adapter", "model", CHECKPOINTS, "train_summary.json"):
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif not resume and list_checkpoints(path):
        raise ClmtuneError(f"{path} holds checkpoints of an unfinished run; continue it with --resume, or start over "
                           "with --overwrite")
    path.mkdir(parents=True, exist_ok=True)


def trainable_summary(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "all_params": total}


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order of ``n`` rows that is a pure function of (seed, epoch), optionally without its first rows.

    With ``lengths`` the order is length-grouped (``train.group_by_length``): rows are shuffled, cut into groups
    of ``mega_batches`` batches, each group sorted by length (stable sort, so ties keep their random order) and
    cut into batches, and the full batches are shuffled; the batch holding the longest row goes first (an
    out-of-memory error shows on step 1, not at the end of the epoch) and a partial batch, if any, last, so that
    the DataLoader's consecutive ``batch_size`` chunks are exactly these batches. The same idea as transformers'
    ``LengthGroupedSampler``; hand-written because that one keeps the groups in order and draws from a generator
    whose state depends on the past (resuming needs a pure function of the epoch).

    Hand-written on purpose: ``RandomSampler`` draws each epoch's order from a generator whose state depends on
    everything drawn before, so a resumed run would have to replay it; here ``set_epoch`` alone restores it.
    Skipping is done here too, not with ``accelerate``'s ``skip_first_batches``: that builds a new DataLoader
    whose per-epoch base seed is drawn from the *global* RNG, which shifts every later dropout mask.
    ``accelerate`` shards the batches of this sampler across processes (DDP).
    """

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 mega_batches: int = 50):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.lengths, self.batch_size, self.mega_batches = lengths, batch_size, mega_batches

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoaderShard at every ``iter()`` with its own epoch counter."""
        self.epoch = epoch

    def skip_rows(self, skip: int) -> None:
        """Leave out the current epoch's first ``skip`` rows (already trained on). Set it per epoch."""
        self.skip = skip

    def __len__(self) -> int:
        return self.n - self.skip

    def order(self) -> list[int]:
        """The whole epoch's row order (before skipping)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None or self.batch_size <= 1:
            return perm
        b, group = self.batch_size, self.batch_size * self.mega_batches
        batches = []
        for start in range(0, self.n, group):  # every group but the last is a whole number of batches
            rows = sorted(perm[start:start + group], key=lambda i: -self.lengths[i])
            batches += [rows[k:k + b] for k in range(0, len(rows), b)]
        partial = [x for x in batches if len(x) < b]  # at most one: the end of the last group
        full = [x for x in batches if len(x) == b]
        full = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
        return [i for batch in full + partial for i in batch]

    def __iter__(self):
        return iter(self.order()[self.skip:])


class _RowCollator:
    """``data.collate`` plus the rows' indices (``rows``: (B,)), so we can report which rows each process saw."""

    def __init__(self, pad_id: int, length: int | None, pad_to_multiple_of: int | None = None):
        self.pad_id, self.length, self.multiple = pad_id, length, pad_to_multiple_of

    def __call__(self, feats):
        batch = collate(feats, self.pad_id, length=self.length, pad_to_multiple_of=self.multiple)
        batch["rows"] = torch.tensor([f["row"] for f in feats])
        return batch


def _accelerator(cfg: RunConfig, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    t_cfg = cfg.train
    # accelerate keeps process-wide singletons: a second train() in one process (tests, notebooks) could not
    # change precision, and a run that crashed leaves its dataloader registered. Each train() is a fresh run.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs = {}
    if t_cfg.deepspeed is not None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ClmtuneError(f"train.deepspeed={t_cfg.deepspeed!r} needs the deepspeed package (pip install "
                               "deepspeed) and CUDA GPUs; without them, leave train.deepspeed unset")
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=str(Path(t_cfg.deepspeed).expanduser()),
                                                     gradient_accumulation_steps=t_cfg.gradient_accumulation_steps)
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # torchrun on a CPU-only machine: accelerate picks DDP over gloo only when told cpu=True (without it every
        # process silently trains alone on all the data). `accelerate launch --cpu` sets this itself.
        kwargs["cpu"] = True
    return Accelerator(gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
                       mixed_precision="bf16" if precision == "bf16" else "no", **kwargs)


def frozen_matmul_weights_to_bf16(model) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Store the frozen Linear/Conv1D weights in bf16 for bf16 autocast; returns (parameter, fp32 data) pairs
    to put back with ``restore_weights``.

    Hidden cost this removes: autocast only caches its bf16 casts of weights that require grad, so it re-casts
    every frozen weight at every forward. For BLOOM's 250,880 x 1024 LM head that is 1 GB read + 0.5 GB written
    per step (0.27 s measured on this 2-core machine), more than the head's matmul on the labelled positions.
    The matmuls see exactly the bf16 weights autocast would have made; a tied input embedding becomes bf16 too
    (as when loading the model in bf16). Trainable weights (the adapter) stay fp32. Memory: the fp32 originals
    are kept, so frozen matmul weights take 1.5x their fp32 size during training.
    """
    swapped, seen = [], set()
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if w.requires_grad or w.dtype != torch.float32 or id(w) in seen:
            continue
        seen.add(id(w))
        swapped.append((w, w.data))
        w.data = w.data.to(torch.bfloat16)
    return swapped


def restore_weights(swapped: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for w, data in swapped:
        w.data = data


def _train_window(window: list[dict], model, accelerator, head: tuple[str | None, int], n_proc: int,
                  rows_seen: list[int] | None) -> tuple[float, int]:
    """Forward + backward over one optimizer step's batches (gradient accumulation); returns the summed loss and
    the number of supervised tokens of the window, over all processes.

    The gradient is that of (sum of token losses) / (supervised tokens of the whole window, all processes): each
    token weighs the same, however the tokens fall into batches and processes (the mean of per-batch means would
    overweight short labels in small batches). ``accelerator.backward`` divides by its accumulation steps and DDP
    averages over processes; the scale undoes both. Costs one all-reduce of one integer per step under DDP.
    """
    n_sup = sum(supervised_tokens(b["labels"]) for b in window)
    if n_proc > 1:
        n_sup = int(accelerator.reduce(torch.tensor(n_sup, device=accelerator.device), "sum"))
    scale = accelerator.gradient_accumulation_steps * n_proc / max(n_sup, 1)
    total = 0.0
    for k, batch in enumerate(window):
        rows = batch.pop("rows")
        if rows_seen is not None:
            rows_seen.extend(rows.tolist())
        last = k == len(window) - 1
        # our own accumulation, not accelerator.accumulate(): the window is fetched ahead (to count its tokens),
        # which makes accelerate's end-of-dataloader test fire one window early
        accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            inputs = forward_inputs(model, batch)
            if head[0]:  # LM head (d x V matmul) on the supervised positions only: (N, V) logits, not (B, T, V)
                inputs["logits_to_keep"] = head_positions(batch["labels"], *head)
            logits = model(**inputs).logits
            loss = causal_lm_loss(logits, batch["labels"], reduction="sum")
            accelerator.backward(loss * scale)
        total += loss.item()
    if n_proc > 1:  # the logged loss is the mean over every process's tokens
        total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum"))
    return total, n_sup


def train(cfg: RunConfig, progress: bool = True, resume: str | None = None) -> TrainResult:
    """Train as ``cfg`` says and write the run folder (see README: "What a run folder holds").

    ``resume``: ``"latest"`` (newest checkpoint of ``train.output_dir``) or a checkpoint folder.
    """
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    cfg, auto = resolve_defaults(cfg, announce=int(os.environ.get("RANK", "0")) == 0)  # every `auto` -> a value
    t_cfg = cfg.train
    out = Path(t_cfg.output_dir)
    precision = t_cfg.precision
    if precision == "bf16" and (reason := bf16_unsupported_reason()):
        log.warning("train.precision=bf16 asked for, but %s; training in fp32 instead", reason)
        precision = "fp32"
    accelerator = _accelerator(cfg, precision)
    main = accelerator.is_main_process
    n_proc = accelerator.num_processes
    ckpt = None
    if resume is not None:
        if t_cfg.deepspeed is not None:
            raise ClmtuneError("--resume is not supported with train.deepspeed (DeepSpeed shards the optimizer "
                               "state); restart the run, or resume without DeepSpeed")
        ckpt = resolve_resume(out, resume)
        _check_same_config(cfg, json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["config"], ckpt)
    if main:
        prepare_output_dir(out, t_cfg.overwrite, resume is not None)
    accelerator.wait_for_everyone()  # no process reads the folder before rank 0 has checked/cleaned it
    set_seed(t_cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(tokenizer, cfg.data, context_length=context_length(cfg.model), progress=progress and main)
    # rows as plain dicts with their index: the sampler/collator report which rows each process saw
    features = [{"input_ids": ids, "labels": lab, "row": i}
                for i, (ids, lab) in enumerate(zip(data.train["input_ids"], data.train["labels"]))]
    truncated = data.report["splits"]["train"]["truncated"]
    log.info(data.summary_line())

    is_peft = cfg.peft.method != "full"
    base = load_model(cfg.model)
    check_tokenizer_fits(base, tokenizer, cfg.model.name_or_path)
    model = apply_peft(base, cfg.peft, tokenizer_path=resolve_model_path(cfg.model.name_or_path))
    params = trainable_summary(model)
    log.info("model: %s, method %s, %d trainable of %d parameters (%.3f%%)", cfg.model.name_or_path,
             cfg.peft.method, params["trainable_params"], params["all_params"],
             100 * params["trainable_params"] / params["all_params"])

    swapped = []
    if precision == "bf16" and t_cfg.deepspeed is None and is_peft:
        swapped = frozen_matmul_weights_to_bf16(model)
    lengths = [len(f["input_ids"]) for f in features] if t_cfg.group_by_length else None
    sampler = EpochSampler(len(features), t_cfg.seed, lengths, t_cfg.batch_size)
    length = cfg.data.max_length if cfg.data.padding == "max_length" else None
    # Own generator: DataLoader draws a base seed per epoch; from the global RNG that would shift dropout masks
    # between an uninterrupted and a resumed run.
    loader = torch.utils.data.DataLoader(features, batch_size=t_cfg.batch_size, sampler=sampler,
                                         generator=torch.Generator().manual_seed(t_cfg.seed),
                                         collate_fn=_RowCollator(data.pad_id, length, cfg.data.pad_to_multiple_of))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t_cfg.learning_rate,
                                  weight_decay=t_cfg.weight_decay)
    # Per process: accelerate hands each process every n_proc-th batch (padding the last round: even_batches).
    batches_per_epoch = math.ceil(len(loader) / n_proc)
    steps_per_epoch = math.ceil(batches_per_epoch / t_cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * t_cfg.epochs
    if t_cfg.max_steps is not None:
        total_steps = min(total_steps, t_cfg.max_steps)
    # accelerate's scheduler wrapper steps the schedule n_proc times per optimizer step, hence the factor.
    scheduler = get_linear_schedule_with_warmup(optimizer, t_cfg.warmup_steps * n_proc, total_steps * n_proc)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]  # what train.max_grad_norm clips

    step, epoch0, skip, first_loss = 0, 0, 0, None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, is_peft)
        step, epoch0, skip, first_loss = state["step"], state["epoch"], state["batch_in_epoch"], state["first_loss"]
        log.info("resuming from %s: step %d, epoch %d, %d batches of it done", ckpt, step, epoch0 + 1, skip)

    log_path = out / "train_log.jsonl"
    if main:
        save_config(cfg, out / "config.yaml")
        if ckpt is not None and log_path.is_file():  # keep the log lines up to the checkpoint's step
            kept = [ln for ln in log_path.read_text(encoding="utf-8").splitlines()
                    if ln and json.loads(ln)["step"] <= step]
            log_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    log_file = open(log_path, "a" if ckpt is not None else "w", encoding="utf-8") if main else None
    losses, window_tokens, t0 = [], 0, time.perf_counter()
    window_start = t0
    rows_seen: list[int] = []  # rows this process trained on in its first epoch (reported for DDP)
    last_saved = step if ckpt is not None else -1

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        nonlocal last_saved
        if batch_in_epoch >= batches_per_epoch:  # store the next position: start of the next epoch
            epoch, batch_in_epoch = epoch + 1, 0
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": total_steps,
                 "first_loss": first_loss, "loss": losses[-1] if losses else None, "config": cfg.to_dict()}
        where = save_checkpoint(out, model, optimizer, scheduler, accelerator, state, t_cfg.save_total_limit,
                                is_peft)
        last_saved = step
        log.debug("checkpoint written: %s", where)

    ga = t_cfg.gradient_accumulation_steps
    head: tuple[str | None, int] = (None, 0)  # (head_positions mode, virtual tokens)
    if t_cfg.logits_on_labels_only:
        mode, reason = head_trim_support(model)
        if reason:
            log.info("LM head on every position (full logits): %s", reason)
        elif mode == "last":
            log.info("LM head on the last labelled positions of each batch (this model's forward takes an integer "
                     "logits_to_keep only)")
        head = (mode, virtual_tokens(model))
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and main), unit="step")
    model.train()
    if ckpt is not None:
        _set_rng_state(state["rng"])  # last: everything above may consume random numbers
    try:
        for epoch in range(epoch0, t_cfg.epochs):
            if step >= total_steps:
                break
            # skip: batches per process already done; each was one of n_proc consecutive batches of the order
            batch_in_epoch = skip if epoch == epoch0 else 0
            loader.set_epoch(epoch)  # DataLoaderShard re-sends its counter to the sampler at iter(): keep them equal
            sampler.skip_rows(batch_in_epoch * n_proc * t_cfg.batch_size)
            batches = iter(loader)
            while window := list(itertools.islice(batches, ga)):
                loss_sum, n_sup = _train_window(window, model, accelerator, head, n_proc, rows_seen
                                                if epoch == 0 else None)
                grad_norm = None  # the global norm before clipping, logged as transformers.Trainer does
                if t_cfg.max_grad_norm is not None and t_cfg.deepspeed is None:  # DeepSpeed clips in its engine
                    grad_norm = float(accelerator.clip_grad_norm_(trainable, t_cfg.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                batch_in_epoch += len(window)
                window_tokens += sum(int(b["attention_mask"].sum()) for b in window)
                losses.append(loss_sum / max(n_sup, 1))
                if first_loss is None:
                    first_loss = losses[0]
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if main and (step % t_cfg.log_every == 0 or step == total_steps):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": epoch + 1, "loss": round(losses[-1], 6),
                              "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                              "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1)}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    window_tokens, window_start = 0, now
                if t_cfg.save_steps and (step % t_cfg.save_steps == 0 or step == total_steps):
                    checkpoint(epoch, batch_in_epoch)
                if step >= total_steps:
                    break
    finally:
        bar.close()
        if log_file:
            log_file.close()
        restore_weights(swapped)  # the returned model is the fp32 one saved to disk
    seconds = time.perf_counter() - t0
    if not losses and ckpt is None:
        raise ClmtuneError("no training step was run; check train.epochs, train.max_steps and the data")
    final_loss = losses[-1] if losses else json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["loss"]
    if t_cfg.save_steps and last_saved != step:
        checkpoint(t_cfg.epochs - 1, batches_per_epoch)

    accelerator.wait_for_everyone()
    weights = _trainable_state(model, accelerator)  # collective (ZeRO-3 gather); the real weights, not shards
    per_rank = gather_object([rows_seen]) if n_proc > 1 else [rows_seen]
    if main:
        unwrapped = accelerator.unwrap_model(model)
        name = "adapter" if is_peft else "model"
        tmp = out / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out / "tokenizer")
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)  # `adapter/` (or `model/`) appears complete or not at all
        summary = {"steps": step, "epochs": t_cfg.epochs, "seconds": round(seconds, 2),
                   "first_loss": first_loss, "final_loss": final_loss, "method": cfg.peft.method,
                   "model": cfg.model.name_or_path, "learning_rate": t_cfg.learning_rate,
                   "max_length": cfg.data.max_length, "auto": auto,
                   "precision": precision, "lm_head_positions": head[0] or "all",
                   "resumed_from": str(ckpt) if ckpt else None,
                   "pad_token": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id},
                   "end_token": data.report["end_token"],
                   "truncated_train_rows": truncated, "labels": data.labels, "data": data.report["data"], **params}
        if n_proc > 1:
            summary["distributed"] = {"num_processes": n_proc, "rows_seen_first_epoch_per_rank": per_rank}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, steps=step, first_loss=first_loss, final_loss=final_loss, seconds=seconds,
                       has_eval_split=data.eval is not None and len(data.eval) > 0, resumed_from=ckpt,
                       model=accelerator.unwrap_model(model))
