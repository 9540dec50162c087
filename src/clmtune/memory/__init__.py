"""Memory of a training run: the estimate (``estimate``: weights, gradients, optimizer state, activations; what it
is of and how close it comes are in that module's docstring), what it reads off a built model (``parts``), and the
measured resident or GPU peak (``measure``)."""

from clmtune.memory.estimate import (BACKWARD_WORKSPACE, GIB, MIB, MemoryEstimate, ModelShape,
                                     activation_bytes_per_token_layer, estimate, estimate_before_loading,
                                     estimate_for_model, estimate_run, mib)
from clmtune.memory.measure import current_rss, measured_peak, peak_rss, reset_peak, runtime_rss
from clmtune.memory.parts import (autocast_weight_copies_bytes, frozen_fp32_matmul_params, has_lora_dropout,
                                  lora_inputs, swapped_originals_bytes)

__all__ = ["BACKWARD_WORKSPACE", "GIB", "MIB", "MemoryEstimate", "ModelShape", "activation_bytes_per_token_layer",
           "autocast_weight_copies_bytes", "current_rss", "estimate", "estimate_before_loading", "estimate_for_model",
           "estimate_run", "frozen_fp32_matmul_params", "has_lora_dropout", "lora_inputs", "measured_peak", "mib",
           "peak_rss", "reset_peak", "runtime_rss", "swapped_originals_bytes"]
