"""bench/gpu_bench.py --smoke: every configuration of issue 27's GPU run at toy size on the CPU, so the one GPU call
a session gets does not fail on a typo. Checks the JSON's shape, and that a configuration that fails is recorded
while the run goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_configuration(tmp_path):
    import gpu_bench

    env = {**os.environ, "GPU_BENCH_FAIL": "tut_trainer", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--out", str(tmp_path), "--smoke",
                        "--budget-s", "1200"], capture_output=True, text=True, timeout=1500, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_bench_cpu-smoke.json").read_text())
    assert set(doc["results"]) == {name for name, _ in gpu_bench.CONFIGS}
    summary = doc["summary"]
    for key in ("device", "vs_tutorial", "vs_trainer", "vs_trl", "mfu", "memory", "inference"):
        assert key in summary
    res = doc["results"]
    assert "failed on purpose" in res["tut_trainer"]["error"] and summary["failed"] == ["tut_trainer"]
    for name, r in res.items():
        if name.endswith("_trl") and "skipped" in r:
            continue
        assert "error" in r or r.get("seconds", 0) > 0 or r.get("speedup", 0) > 0, (name, r)
    for name in ("tut_tutorial", "tut_clmtune_bf16", "tut_clmtune_fp32", "sft_llama1b_clmtune",
                 "sft_bloom560m_full"):
        assert res[name]["tokens_per_s"] > 0 and "error" not in res[name], res[name]
    fast = res["tut_clmtune_bf16_chunked"]
    assert fast["lm_head_loss"] == "chunked"
    assert res["tut_clmtune_bf16_compile"]["speed"]["compile"] is True
    assert summary["vs_tutorial"]["clmtune_bf16"] > 0 and summary["vs_trainer"]["clmtune_bf16"] is None
    assert res["sft_bloom560m_clmtune"]["flops_per_token"] > 0
    assert res["infer_rank"]["speedup"] > 0 and res["infer_generate"]["speedup"] > 0
    assert res["serve_16"]["clients"] == 16 and res["serve_16"]["tokens_per_s"] > 0
    text = gpu_bench.table(doc)  # bench/README.md's table (--table)
    assert "| tut_tutorial |" in text and "failed on purpose" in text and "summary: " in text
