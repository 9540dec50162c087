"""The model the evaluation during training scores: a copy of the training model as ``clmtune eval`` would load it
from the same weights, put into inference precision by the same function (``clmtune.inference.for_inference``).

Why a copy: the fast inference path (bf16, the adapter merged into the weights, oneDNN-packed matmuls with fused
activations, the rank search that needs them) changes the model in place and has no backward. On the training model
itself evaluation ran unmerged, under autocast, on every LoRA layer's extra matmuls: ~5x slower than ``clmtune
eval``, and with numbers that differed from it. The copy costs one model's memory for the time of an evaluation.
It draws no random number and leaves the training model as it was.
"""

from __future__ import annotations

import copy
import logging

import torch

from clmtune.inference import for_inference

log = logging.getLogger("clmtune")


def inference_copy(model: torch.nn.Module, swapped=(), activations=(), dtype: str = "auto") -> torch.nn.Module:
    """A copy of ``model`` (an unwrapped training model) in eval mode and in the precision ``dtype`` resolves to.

    ``swapped``: (parameter, original data) pairs the training replaced by bf16 copies
    (``train.precision.frozen_matmul_weights_to_bf16``): the copy holds the originals, as loaded from disk (merging
    an adapter into a bf16-rounded weight would give other numbers than ``clmtune eval``).
    ``activations``: (parent, name, original module) of the activations swapped for training
    (``one_op_tanh_gelu``): the copy holds the originals, which ``for_inference`` fuses into the packed matmuls.
    """
    memo: dict[int, object] = {}
    for param, data in swapped:
        memo[id(param)] = torch.nn.Parameter(data.clone(), requires_grad=False)
    for parent, name, original in activations:
        memo[id(getattr(parent, name))] = copy.deepcopy(original)
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        # accelerate's mixed-precision wrapper and torch.compile set an instance ``forward`` whose closure calls the
        # training model's forward: the copy runs its class's own forward
        for attr in ("forward", "_original_forward", "_clmtune_compile_state"):
            module.__dict__.pop(attr, None)
    twin.requires_grad_(False)
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # for_inference says what it did at every evaluation otherwise
    try:
        twin, precision, why = for_inference(twin.eval(), dtype)
    finally:
        log.setLevel(level)
    log.debug("evaluation during training in %s (%s)", precision, why)
    return twin.eval()
