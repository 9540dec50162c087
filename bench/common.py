"""What the benchmarks share: the machine a result was measured on and the file it goes to.

A result file is named by benchmark, case and machine: ``results/<bench>_<case>_<machine>.json``, where machine is
``cpu`` or the GPU's short name (``h100``, ``h200``, ...). A new run of the same benchmark on the same kind of
machine replaces the file; earlier results live in git history. The CPU's name comes from ``clmtune.device``
(the product uses it to explain its bf16 choice), so it is written once.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "src"))  # the benchmarks run from a checkout, installed or not

from clmtune.device import cpu_matrix_features, cpu_name  # noqa: E402

__all__ = ["RESULTS", "cpu_matrix_features", "cpu_name", "machine_tag", "result_path"]


def machine_tag(device: str = "cpu") -> str:
    """``cpu``, or for a CUDA device the GPU's model as a short lowercase name (``NVIDIA H100 80GB HBM3`` -> ``h100``)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    found = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    return found.group(1).lower() if found else "gpu"


def result_path(bench: str, case: str = "", device: str = "cpu") -> Path:
    """``results/<bench>[_<case>]_<machine>.json`` (the folder is created)."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / f"{bench}{'_' + case if case else ''}_{machine_tag(device)}.json"
