"""What the hardware can do fast: does this CPU/GPU have native bf16 matrix units?

Used to pick a default precision (``auto``) for generation (``generate.dtype``), evaluation and training
(``train.precision``): bf16 where the hardware multiplies bf16 matrices natively, fp32 elsewhere (bf16 without
native units runs through conversions and is slower than fp32).

- CPU: the ``avx512_bf16`` or ``amx_bf16`` flags of ``/proc/cpuinfo`` (Linux), and oneDNN built with bf16 kernels.
  Plain AVX-512 without them only emulates bf16, so it does not count.
- CUDA: compute capability 8.0 or newer (Ampere: bf16 tensor cores).
- MPS and anything else: fp32.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16")
"""Values of ``generate.dtype`` (and of the other ``auto``-able precision settings)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_matrix_features() -> dict:
    """CPU name, cores and the matrix features that decide bf16 speed; printed with every benchmark result."""
    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def describe_cpu() -> str:
    """One line, e.g. ``AMD EPYC, 2 cores, avx512_bf16 yes, amx no``."""
    f = cpu_matrix_features()
    yes = {True: "yes", False: "no"}
    return (f"{f['cpu']}, {f['cores']} cores, avx512_bf16 {yes[f['avx512_bf16']]}, amx {yes[f['amx_bf16']]}, "
            f"torch {f['torch_cpu_capability']}")


def _onednn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(whether ``device`` has native bf16 matrix units, the reason in a few words)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        major, minor = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores (needs 8.0+)"
    if dev.type != "cpu":
        return False, f"{dev.type}: bf16 matrix support not checked, fp32 is the safe choice"
    flags = cpu_flags()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not units:
        return False, f"this CPU ({cpu_name()}) has no native bf16 matrix units (no avx512_bf16 / amx_bf16)"
    if not _onednn_bf16():
        return False, "torch's oneDNN has no bf16 kernels on this CPU"
    return True, f"this CPU ({cpu_name()}) has {' and '.join(units)}"


def resolve_precision(choice: str, device: str | torch.device = "cpu") -> tuple[str, str]:
    """(``fp32`` or ``bf16``, why) for a setting of ``auto``, ``fp32`` or ``bf16``.

    ``auto``: bf16 where ``native_bf16``, else fp32. An explicit ``bf16`` is kept even without native units
    (it still works, only slower) -- except on a CPU without oneDNN bf16 kernels, where it falls back to fp32.
    """
    if choice == "fp32":
        return "fp32", "asked for fp32"
    ok, why = native_bf16(device)
    if choice == "auto":
        return ("bf16" if ok else "fp32"), f"auto: {why}"
    if torch.device(device).type == "cpu" and not _onednn_bf16():
        return "fp32", "bf16 asked for, but torch's oneDNN has no bf16 kernels on this CPU; fp32 instead"
    return "bf16", "asked for bf16" + ("" if ok else f" ({why}: expect it to be slower than fp32)")


def training_device() -> str:
    """Where ``accelerate`` will train (``cuda`` when a GPU is visible, else ``cpu``): what ``precision: auto``
    asks about."""
    return "cuda" if torch.cuda.is_available() else "cpu"
