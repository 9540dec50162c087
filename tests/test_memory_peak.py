"""The memory estimate against the real peak: each case trains with the real CLI in a child process (one torch
thread) and its estimate of the peak resident memory (train_summary.json: runtime + the training step) must be
within 25 % of that child's measured peak RSS, both ways. The measured peak is the child's own VmHWM at its
exit (``ru_maxrss`` would also count this test process's memory at the fork): the whole process from exec to exit, Python and the imports included, nothing subtracted. Other
processes on the machine do not change a process's RSS, so the bounds hold on a busy machine; only time does.

The cases and the measurement are bench/bench_memory.py's ``--matrix`` (bench/README.md has the table)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
MEASURED: dict[str, dict] = {}


def measured(case: str, tmp_path_factory) -> dict:
    """Each case trained once per test session (the prepare test reuses a fast case's run)."""
    if case not in MEASURED:
        MEASURED[case] = bench.measure_case(case, tmp_path_factory.mktemp("memory"))
    return MEASURED[case]


def _check(result: dict) -> None:
    assert 0.75 <= result["ratio"] <= 1.25, (
        f"{result['case']}: estimated {result['estimate'] / 2 ** 20:.0f} MiB (runtime {result['runtime'] / 2 ** 20:.0f}"
        f" + step {result['step'] / 2 ** 20:.0f}), measured peak RSS {result['measured'] / 2 ** 20:.0f} MiB")


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c in bench.FAST else [pytest.mark.slow])
                                  for c in bench.MATRIX])
def test_estimate_within_25_percent_of_the_peak_rss(case, tmp_path_factory):
    _check(measured(case, tmp_path_factory))


def test_prepare_estimates_the_training_peak(tmp_path_factory):
    """`clmtune prepare` (a process of its own, the model built on the meta device) prints the estimated peak of
    training: within 25 % of what training then measures. The shipped model with LoRA, bf16, as the issue's
    578 MiB estimate against 1,776 MiB measured."""
    case = "gpt2zh_lora_bf16_b8_L128"
    config, overrides = bench.MATRIX[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "clmtune", "prepare", "--config", config, *overrides],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "peak resident memory (RSS) of the training process" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("estimated peak"))
    estimated = float(re.search(r"([\d,]+) MiB", line).group(1).replace(",", "")) * 2 ** 20
    run = measured(case, tmp_path_factory)
    _check({**run, "estimate": estimated, "ratio": round(estimated / run["measured"], 3)})
