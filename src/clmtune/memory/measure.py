"""The measured side: resident memory now and at its peak (Linux /proc, else ``ru_maxrss``), the peak's reset, and a
GPU's allocated peak."""

from __future__ import annotations

import resource
import sys

import torch


def runtime_rss() -> int:
    """Resident memory of this process before the weights load, with the libraries that loading brings in
    (peft, accelerate: ~160 MiB of RSS that a measurement taken before their import would leave out)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401

    return current_rss()


def current_rss() -> int:
    """Resident memory of this process now (bytes; Linux /proc, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory in bytes since the start or the last ``reset_peak`` (Linux: VmHWM of
    /proc/self/status; elsewhere ru_maxrss: KiB on Linux, bytes on macOS, never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device | str | None = None) -> None:
    """Measure the peak from now on: ``torch.cuda.reset_peak_memory_stats`` on a GPU; on Linux, writing 5 to
    /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS, so a run in a notebook or test process
    is not charged with what earlier work in the process used."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measured_peak(device: torch.device | str | None = None) -> int:
    """Peak memory of the training device: ``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return peak_rss()
