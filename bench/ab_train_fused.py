"""A/B in one process: LoRA training with the LM head and the loss as before (``logits``: (N, V) logits, then
``F.cross_entropy``; in bf16 the frozen head's copy column-major) against the fused frozen-head cross-entropy
(``fused``: ``clmtune.train.fusedhead``, the loss and the input gradient in one pass over the vocabulary; in bf16
on the head's oneDNN-packed blocks, ``PackedHead``), in bf16 and in fp32.

    python bench/ab_train_fused.py --repeats 3                     # BLOOM-architecture bench, bf16 and fp32
    python bench/ab_train_fused.py --precisions bf16 --repeats 5
    python bench/ab_train_fused.py --model gpt2zh --repeats 2

Alternates the variants, one epoch each, one torch thread; reports per run the loop's wall and CPU time
(``TrainRecipe.fit``), the one-time preparation (the bf16 cast of the frozen weights and the head's packing, inside
train(), outside the loop) and the train-set loss after the epoch. Writes bench/results/ab_train_fused_<model>.json.
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

    ap = bt.ab_args(__doc__)
    ap.add_argument("--precisions", default="bf16,fp32")
    args = ap.parse_args()
    import clmtune.train as tr
    import clmtune.train.fusedhead as fh
    from clmtune.config import from_dict
    from clmtune.device import cpu_matrix_features

    work, cfg_dict, enc, feats = bt.ab_setup(args.model, "ab_fused", args.threads)
    to_bf16, fit, packed_head = tr.frozen_matmul_weights_to_bf16, tr.TrainRecipe.fit, tr.PackedHead
    prep, fit_cpu, modes = [], [], []

    def timed_to_bf16(model, column_major_head=False, keep=()):
        t = time.process_time()
        out = to_bf16(model, column_major_head, keep)
        prep.append(time.process_time() - t)
        return out

    def timed_packed_head(weight):
        t = time.process_time()
        out = packed_head(weight)
        prep[-1] += time.process_time() - t  # after the cast of the other frozen weights
        return out

    def timed_fit(self):
        prep.append(0.0) if self.precision == "fp32" else None
        modes.append("fused" if self.head.fused is not None else "logits")
        c = time.process_time()
        out = fit(self)
        fit_cpu.append(time.process_time() - c)
        return out

    tr.frozen_matmul_weights_to_bf16, tr.TrainRecipe.fit, tr.PackedHead = timed_to_bf16, timed_fit, timed_packed_head

    def run(precision: str, fused: bool) -> dict:
        fh.FUSED_PRECISIONS = frozenset({precision} if fused else ())
        d = json.loads(json.dumps(cfg_dict))
        d["train"]["precision"] = precision
        res = tr.train(from_dict(d).validate(), progress=False)
        assert modes[-1] == ("fused" if fused else "logits"), modes[-1]
        return {"loop_wall_s": res.seconds, "loop_cpu_s": fit_cpu[-1], "prep_cpu_s": prep[-1],
                "train_set_loss": bt.train_set_loss(res.model, feats, enc.pad_id), "load_average": os.getloadavg()}

    variants = {f"{p}_{k}": (p, k == "fused") for p in args.precisions.split(",") for k in ("logits", "fused")}
    run(*next(iter(variants.values())))  # warm-up
    out = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in out:
            out[name].append(run(*variants[name]))
            r = out[name][-1]
            print(f"{name:<12} loop {r['loop_wall_s']:.2f} s wall, {r['loop_cpu_s']:.2f} s cpu; prep "
                  f"{r['prep_cpu_s']:.2f} s; train-set loss {r['train_set_loss']:.4f}; load {r['load_average'][0]:.1f}",
                  flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("loop_wall_s", "loop_cpu_s", "prep_cpu_s")}
           for k, v in out.items()}
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "threads": args.threads,
              "machine": {**cpu_matrix_features(), "load_average": os.getloadavg()}, "runs": out, "median": med}
    (HERE / "results" / f"ab_train_fused_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, m in med.items():
        print(f"median {k:<12} loop {m['loop_wall_s']:.2f} s wall, {m['loop_cpu_s']:.2f} s cpu, prep {m['prep_cpu_s']:.2f} s")
    for p in args.precisions.split(","):
        a, b = med[f"{p}_logits"], med[f"{p}_fused"]
        print(f"{p}: fused vs logits {a['loop_cpu_s'] / b['loop_cpu_s']:.3f}x loop cpu, "
              f"{a['loop_wall_s'] / b['loop_wall_s']:.3f}x loop wall")


if __name__ == "__main__":
    main()
