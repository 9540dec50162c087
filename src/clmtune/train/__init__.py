"""Train stage: fine-tune a causal LM with a peft adapter (or every weight) on classification-as-generation data.

Engine: a plain ``accelerate`` loop, as in peft's causal-LM example, rather than ``transformers.Trainer``:
the same code runs on one CPU, under ``accelerate launch``/``torchrun`` (DDP, gloo on CPU) and with DeepSpeed,
and we keep control of what the loss is computed on (only the supervised positions) and of what is saved when.

Steps (a recipe in the manner of torchtune's recipe classes / litgpt's setup-fit-save): ``TrainRecipe.setup``
(``recipe``; it calls ``setup``'s functions, each returning what it builds: precision, output folder, data, model +
adapter, optimization, resumed state), ``fit`` (the optimizer steps, logging and checkpoints; one step's forward and
backward is ``step.train_window``) and ``save`` (weights, tokenizer, summary). ``train(cfg)`` runs the three.
Pieces live beside it: ``loss`` (the loss and LM-head trimming), ``sampler`` (the data order), ``precision``
(bf16), ``checkpoints``, ``watch`` (evaluation during training, on ``evalcopy``'s inference copy).

Speed (measured by bench/bench_train.py): batches are length-grouped (``EpochSampler``) and padded
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

from clmtune.train.checkpoints import list_checkpoints, resolve_resume
from clmtune.train.loss import (HeadMode, causal_lm_loss, head_positions, head_trim_support, logits_to_keep,
                                supervised_tokens, virtual_tokens)
from clmtune.train.precision import bf16_unsupported_reason
from clmtune.train.recipe import TrainRecipe, TrainResult, train
from clmtune.train.sampler import EpochSampler

__all__ = ["EpochSampler", "HeadMode", "TrainRecipe", "TrainResult", "bf16_unsupported_reason", "causal_lm_loss",
           "head_positions", "head_trim_support", "list_checkpoints", "logits_to_keep", "resolve_resume",
           "supervised_tokens", "train", "virtual_tokens"]
