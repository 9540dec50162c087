"""bench/bench_train.py refuses to start a model that does not fit in the free memory, and says what it needs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_too_little_memory_names_what_the_benchmark_needs(tmp_path, monkeypatch):
    bench = _bench()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 1024, "n_layer": 4, "vocab_size": 250880}))
    need = bench.memory_needed_gb(tmp_path)
    # 3 x fp32 weights (4 x 12 x 1024^2 block weights + 250,880 x 1024 embeddings = 307 M) + 0.8 GB
    assert need == pytest.approx(3 * 4 * (12 * 1024 ** 2 * 4 + 1024 * 250880) / 2 ** 30 + 0.8)
    monkeypatch.setattr(bench, "available_memory_gb", lambda: 1.5)
    with pytest.raises(SystemExit, match=rf"the bloom model needs about {need:.1f} GB of free memory .* only 1.5 GB"):
        bench.check_memory("bloom", tmp_path)
    monkeypatch.setattr(bench, "available_memory_gb", lambda: need + 1)
    bench.check_memory("bloom", tmp_path)  # enough: no error
