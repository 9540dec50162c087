"""A/B in one process: clmtune's bf16 LoRA training with and without packed frozen matmuls (clmtune.packed; not
used by train(): this script applies it from outside, after ``frozen_matmul_weights_to_bf16``).

    python bench/ab_train_packed.py --repeats 2

One epoch of the bench's BLOOM-architecture run (bench_train.py's model and data), alternating the two variants;
both the wall-clock time of the training loop and the CPU time of the whole train() call are compared (on a
machine shared with other jobs, CPU time is the steadier one). Also compares the train-set loss after the epoch.
Writes bench/results/ab_train_packed.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    import bench_train as bt
    import clmtune.train as tr
    from clmtune.config import from_dict
    from clmtune.device import cpu_matrix_features
    from clmtune.packed import pack_frozen_linears

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ab_bloom_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
    bt.build_model("bloom", work / "model")
    cfg_dict = bt.task_config("bloom", work / "model", 50, work)
    cfg_dict["train"]["precision"] = "bf16"
    _, _, enc, feats = bt.features(cfg_dict, "longest")
    to_bf16, restore = tr.frozen_matmul_weights_to_bf16, tr.restore_weights
    handles = []

    def to_bf16_packed(model):
        swapped = to_bf16(model)
        handles.append(pack_frozen_linears(model))
        return swapped

    def restore_unpacked(swapped):
        while handles:
            handles.pop().undo()
        restore(swapped)

    def run(packed: bool):
        tr.frozen_matmul_weights_to_bf16 = to_bf16_packed if packed else to_bf16
        tr.restore_weights = restore_unpacked if packed else restore
        cfg = from_dict(json.loads(json.dumps(cfg_dict))).validate()
        c = time.process_time()
        res = tr.train(cfg, progress=False)
        cpu = time.process_time() - c
        return res.seconds, cpu, bt.train_set_loss(res.model, feats, enc.pad_id)

    run(False)  # warm-up
    out = {"plain": [], "packed": []}
    for _ in range(args.repeats):
        for name in ("plain", "packed"):
            out[name].append(run(name == "packed"))
    med = {k: {"loop_wall_s": statistics.median(x[0] for x in v), "train_cpu_s": statistics.median(x[1] for x in v),
               "train_set_loss": v[-1][2]} for k, v in out.items()}
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": {**cpu_matrix_features(),
              "load_average": os.getloadavg()}, "runs": out, "median": med,
              "speedup_wall": med["plain"]["loop_wall_s"] / med["packed"]["loop_wall_s"],
              "speedup_cpu": med["plain"]["train_cpu_s"] / med["packed"]["train_cpu_s"]}
    (HERE / "results" / "ab_train_packed.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, m in med.items():
        print(f"{k:<7} loop {m['loop_wall_s']:.2f} s wall, train() {m['train_cpu_s']:.2f} s cpu, "
              f"train-set loss after {m['train_set_loss']:.4f}")
    print(f"packed / plain: {result['speedup_wall']:.2f}x wall, {result['speedup_cpu']:.2f}x cpu; "
          f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
