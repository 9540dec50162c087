"""What a training run asks of the machine: the accelerate engine (DDP, DeepSpeed; FSDP where accelerate runs
it), the memory options (gradient checkpointing, quantized base), deterministic kernels, and the memory estimate
next to the measured peak.

Split out of the train recipe (``clmtune.train``) so that the recipe stays the order of the steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from clmtune.config import RunConfig
from clmtune.errors import ClmtuneError
from clmtune.memory import MemoryEstimate, current_rss, estimate_run, measured_peak, reset_peak

log = logging.getLogger("clmtune")

FSDP_ON_CPU = ("FSDP asked for (accelerate launch with distributed_type: FSDP), but this machine has no GPU: "
               "accelerate {version} runs FSDP only on GPUs/accelerators and would silently train plain DDP on "
               "the CPU. Use `accelerate launch --cpu --num_processes N` (DDP, every process holds the whole model) "
               "or run configs/accelerate/fsdp.yaml on GPUs")


def make_accelerator(cfg: RunConfig, precision: str):
    """A fresh ``accelerate.Accelerator`` for this run: DDP under ``torchrun``/``accelerate launch``, the
    DeepSpeed plugin for ``train.deepspeed``, FSDP when ``accelerate launch`` was given an FSDP config."""
    import accelerate
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    t_cfg = cfg.train
    # accelerate keeps process-wide singletons: a second train() in one process (tests, notebooks) could not
    # change precision, and a run that crashed leaves its dataloader registered. Each train() is a fresh run.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs = {}
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and not torch.cuda.is_available():
        # Measured with accelerate 1.15 / torch 2.13 on a CPU machine: AcceleratorState chooses FSDP only for
        # MULTI_GPU/NPU/XPU/... distributed types; with cpu=True it stays MULTI_CPU and wraps the model in DDP,
        # without cpu=True every process trains alone (DistributedType.NO). Neither is what the user asked for.
        raise ClmtuneError(FSDP_ON_CPU.format(version=accelerate.__version__))
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
    if t_cfg.report_to:  # accelerate's trackers; RunDir.tensorboard = logging_dir / project name
        from clmtune.train.watch import tracker_check

        tracker_check(t_cfg.report_to)
        kwargs.update(log_with=list(t_cfg.report_to), project_dir=t_cfg.output_dir)
    return Accelerator(gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
                       mixed_precision="bf16" if precision == "bf16" else "no", **kwargs)


def seed_everything(cfg: RunConfig) -> dict | None:
    """Seed python/numpy/torch (all GPUs); with ``train.deterministic`` also switch to deterministic kernels
    (transformers' ``enable_full_determinism``, as ``Trainer(full_determinism=True)`` does). Returns the previous
    global settings for ``restore_determinism`` (the flags are process-wide), or None."""
    from accelerate.utils import set_seed

    if not cfg.train.deterministic:
        set_seed(cfg.train.seed)
        return None
    from transformers.trainer_utils import enable_full_determinism

    before = {"algorithms": torch.are_deterministic_algorithms_enabled(),
              "cudnn_deterministic": torch.backends.cudnn.deterministic,
              "cudnn_benchmark": torch.backends.cudnn.benchmark}
    enable_full_determinism(cfg.train.seed)  # also sets CUBLAS_WORKSPACE_CONFIG=:16:8 for cuBLAS
    return before


def restore_determinism(before: dict | None) -> None:
    if before is not None:
        torch.use_deterministic_algorithms(before["algorithms"])
        torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = before["cudnn_benchmark"]


def prepare_base(model, cfg: RunConfig):
    """Memory options on the loaded base model, before the adapter is attached.

    Quantized base (bitsandbytes): peft's ``prepare_model_for_kbit_training`` (norms in fp32, input-gradient
    hook, checkpointing when asked). Otherwise transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before 5.x),
    non-reentrant:
    the recomputed layers need no input that requires grad, so peft's input-gradient hook
    (``enable_input_require_grads``, needed by the reentrant variant when the embeddings are frozen) is not.
    """
    gc = cfg.train.gradient_checkpointing
    kwargs = {"use_reentrant": False}
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                               gradient_checkpointing_kwargs=kwargs)
    if gc:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ClmtuneError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                               "checkpointing in transformers; set it to false")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation
    return model


def memory_summary(est: MemoryEstimate | None, device: torch.device) -> dict:
    """``train_summary.json``'s ``memory``: the estimate's parts and the measured peak (bytes)."""
    peak = measured_peak(device)
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident memory (VmHWM)"
    out = {"measured_peak": peak, "measured": what}
    if est is not None:
        out["estimate"] = est.as_dict()
        comparable = est.total if device.type == "cuda" else est.total + est.runtime
        out["estimate_over_measured"] = round(comparable / max(peak, 1), 3)
    return out


__all__ = ["reset_peak", "current_rss", "estimate_run", "make_accelerator", "memory_summary", "prepare_base",
           "restore_determinism", "seed_everything"]
