"""A/B/C in one process: bf16 LoRA training as before issue 18 round three (``row_major``: the frozen LM head's bf16
copy row-major, transformers' multi-op tanh-GELU), with the head column-major (``column_major``:
``clmtune.train.precision.column_major_bf16``), and with the GELU as one op too (``column_gelu``:
``one_op_tanh_gelu``; what ``train()`` does on a CPU now).

    python bench/ab_train_head.py --repeats 3            # BLOOM-architecture bench (bench_train.py's model, data)
    python bench/ab_train_head.py --model gpt2zh --repeats 2

Alternates the two variants, one epoch each, one torch thread; reports per run the loop's wall time and CPU time
(``TrainRecipe.fit``), the one-time preparation (casting the frozen weights to bf16, outside the loop, inside
train()), the per-step losses (the two head layouts give the same products; the one-op GELU rounds differently)
and the train-set loss after the epoch. Writes bench/results/ab_train_head_<model>.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def main() -> None:
    import bench_train as bt

    args = bt.ab_args(__doc__).parse_args()
    import clmtune.train as tr
    from clmtune.config import from_dict
    from clmtune.device import cpu_matrix_features

    work, cfg_dict, enc, feats = bt.ab_setup(args.model, "ab_head", args.threads, "bf16")
    # round three's layouts of the logits path (still the bf16 path wherever the fused loss does not apply)
    tr.fused_head_reason = lambda *a, **k: "bench/ab_train_head.py measures the logits path"
    to_bf16, fit, gelu = tr.frozen_matmul_weights_to_bf16, tr.TrainRecipe.fit, tr.one_op_tanh_gelu
    prep, fit_cpu = [], []
    variants = {"row_major": (False, False), "column_major": (True, False), "column_gelu": (True, True)}

    def run(column_major: bool, one_op_gelu: bool) -> dict:
        def timed_to_bf16(model, _column_major_head=False, keep=()):
            t = time.process_time()
            out = to_bf16(model, column_major)
            prep.append(time.process_time() - t)
            return out

        def timed_fit(self):
            c = time.process_time()
            out = fit(self)
            fit_cpu.append(time.process_time() - c)
            return out

        tr.frozen_matmul_weights_to_bf16, tr.TrainRecipe.fit = timed_to_bf16, timed_fit
        tr.one_op_tanh_gelu = gelu if one_op_gelu else (lambda model: [])
        cfg = from_dict(json.loads(json.dumps(cfg_dict))).validate()
        res = tr.train(cfg, progress=False)
        losses = [json.loads(x)["loss"] for x in open(Path(cfg.train.output_dir) / "train_log.jsonl")]
        return {"loop_wall_s": res.seconds, "loop_cpu_s": fit_cpu[-1], "prep_cpu_s": prep[-1], "step_losses": losses,
                "train_set_loss": bt.train_set_loss(res.model, feats, enc.pad_id), "load_average": os.getloadavg()}

    run(False, False)  # warm-up
    out = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in out:
            out[name].append(run(*variants[name]))
            r = out[name][-1]
            print(f"{name:<13} loop {r['loop_wall_s']:.2f} s wall, {r['loop_cpu_s']:.2f} s cpu; prep "
                  f"{r['prep_cpu_s']:.2f} s; train-set loss {r['train_set_loss']:.4f}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("loop_wall_s", "loop_cpu_s", "prep_cpu_s")}
           for k, v in out.items()}
    same = all(a["step_losses"] == b["step_losses"] for a, b in zip(out["row_major"], out["column_major"]))
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "threads": args.threads,
              "machine": {**cpu_matrix_features(), "load_average": os.getloadavg()}, "runs": out, "median": med,
              "same_step_losses": same,
              "speedup_loop_cpu": {k: med["row_major"]["loop_cpu_s"] / m["loop_cpu_s"] for k, m in med.items()},
              "speedup_loop_wall": {k: med["row_major"]["loop_wall_s"] / m["loop_wall_s"] for k, m in med.items()}}
    (HERE / "results" / f"ab_train_head_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, m in med.items():
        print(f"median {k:<13} loop {m['loop_wall_s']:.2f} s wall, {m['loop_cpu_s']:.2f} s cpu, prep {m['prep_cpu_s']:.2f} s")
    for k in med:
        print(f"{k} vs row_major: {result['speedup_loop_wall'][k]:.3f}x loop wall, "
              f"{result['speedup_loop_cpu'][k]:.3f}x loop cpu")
    print(f"same per-step losses row/column: {same}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
