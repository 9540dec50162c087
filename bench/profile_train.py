"""Where does clmtune's training time go? One epoch of the bench's BLOOM-architecture LoRA run under torch.profiler.

    python bench/profile_train.py                    # bf16 (train.precision: bf16), 1 torch thread
    python bench/profile_train.py --precision fp32

Prints the top operators by self CPU time and a breakdown into matmul (aten::mm/addmm/bmm/linear kernels) vs
everything else; writes bench/results/profile_train_<precision>.json. The profile itself adds overhead per op
(a few microseconds), so the absolute time is above bench_train.py's; the shares are what matters.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise", "aten::mkldnn_linear"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_train as bt
    from clmtune.config import from_dict
    from clmtune.train import train

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="profile_bloom_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
    bt.build_model("bloom", work / "model")
    cfg_dict = bt.task_config("bloom", work / "model", 50, work)
    cfg_dict["train"]["precision"] = args.precision
    cfg = from_dict(cfg_dict).validate()
    import clmtune.train as train_mod

    train_mod.check_tokenizer_fits = lambda *a, **k: None  # the bench model's deliberate vocabulary (bench_train)
    train(cfg, progress=False)  # warm-up (oneDNN primitive caches, allocator)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6
    print(f"train() wall {wall:.2f} s (loop {res.seconds:.2f} s) under the profiler; self CPU total {total:.2f} s, "
          f"matmul ops {mm:.2f} s ({100 * mm / total:.1f} %)")
    print(f"{'op':<48} {'self s':>8} {'%':>6} {'calls':>7}")
    top = []
    for e in rows[:args.top]:
        s = e.self_cpu_time_total / 1e6
        print(f"{e.key[:48]:<48} {s:>8.3f} {100 * s / total:>5.1f}% {e.count:>7}")
        top.append({"op": e.key, "self_s": s, "share": s / total, "calls": e.count})
    print(f"\n{'op, input shapes (dtypes)':<100} {'self s':>8} {'calls':>6} {'GFLOP/s':>8}")
    shaped = []
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:args.top]:
        s = e.self_cpu_time_total / 1e6
        gflops = ""
        shp = [x for x in e.input_shapes if x]
        if e.key == "aten::mm" and len(shp) >= 2:
            (m, k), (_, n) = shp[0], shp[1]
            gflops = f"{2 * m * k * n * e.count / s / 1e9:.0f}"
        elif e.key == "aten::addmm" and len(shp) >= 3:
            (m, k), (_, n) = shp[1], shp[2]
            gflops = f"{2 * m * k * n * e.count / s / 1e9:.0f}"
        desc = f"{e.key} {shp}"
        print(f"{desc[:100]:<100} {s:>8.3f} {e.count:>6} {gflops:>8}")
        shaped.append({"op": e.key, "shapes": shp, "self_s": s, "calls": e.count, "gflops": gflops})
    out = HERE / "results" / f"profile_train_{args.precision}.json"
    out.write_text(json.dumps({"precision": args.precision, "threads": args.threads, "wall_s": wall,
                               "loop_s": res.seconds, "self_total_s": total, "matmul_s": mm,
                               "load_average": os.getloadavg(), "top": top, "by_shape": shaped}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
