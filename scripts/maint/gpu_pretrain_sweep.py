"""Pretraining sweep for ``builtin:gpt2-zh-small`` on a lent GPU, in one call of a few minutes.

    python scripts/maint/gpu_pretrain_sweep.py --data DATA --out OUT [--deadline 420]

DATA holds ``corpora/CLUECorpusSmall_sampled.txt`` and ``chnsenticorp/{train,test}.tsv`` (a copy of ../shared/data's
files: the device machine does not see ../shared). Each candidate is ``scripts/maint/pretrain_default.py`` with other
sizes (run in parallel on the one GPU); each pretrained model is then fine-tuned with ``scripts/maint/quality.py`` (LoRA
and full fine-tuning, the shipped classification config, all 9,600 training rows, all 1,200 test rows). Whatever has
not finished by the deadline is stopped. OUT/sweep.json gets every result; the weights of the best candidates come
back as a tar in 15 MiB pieces (the device tool returns at most 8 files of 16 MiB). Developer-only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# name -> pretrain_default.py flags (batch 32 x 256 tokens unless said; ~202 steps per pass over 1.65 M tokens)
CANDIDATES = {
    "l6w320_e12": ["--layers", "6", "--width", "320", "--heads", "5", "--epochs", "12"],
    "l6w320_e30": ["--layers", "6", "--width", "320", "--heads", "5", "--epochs", "30", "--batch", "64",
                   "--lr", "1.5e-3"],
    "l8w288_e12": ["--layers", "8", "--width", "288", "--heads", "8", "--epochs", "12"],
    "l4w256_e12": ["--layers", "4", "--width", "256", "--heads", "4", "--epochs", "12"],
}
FINETUNES = {"lora_e1": ["--only", "lora"], "full_e1": ["--only", "full"], "lora_e2": ["--only", "lora", "--epochs", "2"]}
# --models: no pretraining, this grid of fine-tunings on each given model folder (a hyper-parameter search)
GRID = {
    "lora_lr2e-3_e3": ["--only", "lora", "--epochs", "3"],
    "lora_lr4e-3_e1": ["--only", "lora", "--lora-lr", "4e-3"],
    "lora_lr4e-3_e2": ["--only", "lora", "--lora-lr", "4e-3", "--epochs", "2"],
    "lora_lr1e-3_e3": ["--only", "lora", "--lora-lr", "1e-3", "--epochs", "3"],
    "lora_r64_lr2e-3_e2": ["--only", "lora", "--epochs", "2", "--override", '{"peft": {"r": 64}}'],
    "lora_lr8e-3_e2": ["--only", "lora", "--lora-lr", "8e-3", "--epochs", "2"],
    "lora_lr4e-3_e3": ["--only", "lora", "--lora-lr", "4e-3", "--epochs", "3"],
    "full_lr3e-4_e2": ["--only", "full", "--epochs", "2"],
    "full_lr3e-4_e3": ["--only", "full", "--epochs", "3"],
    "full_lr1e-4_e3": ["--only", "full", "--full-lr", "1e-4", "--epochs", "3"],
}
def _lora(r: int, lr: str, epochs: int) -> list[str]:
    return ["--only", "lora", "--lora-lr", lr, "--epochs", str(epochs), "--override", json.dumps({"peft": {"r": r}})]


GRIDS_LORA = {f"lora_r{r}_lr{lr}_e{e}": _lora(r, lr, e)
              for r, lr, e in ((16, "5e-4", 3), (64, "1e-3", 3), (64, "2e-3", 3), (64, "1e-3", 2), (32, "1e-3", 3),
                               (128, "2e-3", 2))}
EAGER = '{"model": {"attn_implementation": "eager"}}'
GRIDS = {"main": GRID, "lora": GRIDS_LORA, "eager": {"lora_e1_eager": ["--only", "lora", "--override", EAGER],
                                 "full_e1_eager": ["--only", "full", "--override", EAGER]}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/sweep")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds from start; then stop and package")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and steps (to check this script on a CPU)")
    ap.add_argument("--keep", type=int, default=2, help="how many of the best candidates' weights come back")
    ap.add_argument("--models", nargs="*", help="no pretraining: fine-tune these model folders (a grid each)")
    ap.add_argument("--grids", nargs="*", default=[], help="GRIDS' name for each of --models (default main)")
    args = ap.parse_args()
    t0 = time.time()
    out, work, data = Path(args.out), Path(args.work), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cands = CANDIDATES
    if args.smoke:
        cands = {"smoke_a": ["--layers", "1", "--width", "64", "--heads", "2", "--epochs", "1", "--max-steps", "8"],
                 "smoke_b": ["--layers", "2", "--width", "64", "--heads", "2", "--epochs", "1", "--max-steps", "8"]}
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "candidates": {}}
    try:
        import torch

        results["torch"] = torch.__version__
        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        results["torch"] = repr(e)

    def save():
        results["elapsed_s"] = round(time.time() - t0, 1)
        (out / "sweep.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")

    running: dict[str, tuple[subprocess.Popen, float]] = {}

    def launch(key: str, cmd: list[str]) -> None:
        log = open(work / f"{key}.log", "w")
        running[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time())
        print(f"[{time.time() - t0:6.1f}s] start {key}", flush=True)

    if args.models:
        cands = {}
        for i, folder in enumerate(args.models):
            name = Path(folder).name
            results["candidates"][name] = {"folder": folder}
            for ft, flags in GRIDS[args.grids[i] if i < len(args.grids) else "main"].items():
                launch(f"ft_{name}__{ft}", [PY, "scripts/maint/quality.py", "--train-rows", "0", "--no-baseline", "--data",
                                            str(data / "chnsenticorp"), "--model", folder,
                                            "--out", str(work / f"q_{name}_{ft}"), *flags])
    for name, flags in cands.items():
        launch(f"pt_{name}", [PY, "scripts/maint/pretrain_default.py", "--preset", "small", "--shared-data", str(data),
                              "--build",
                              str(work / name), "--no-ship", "--threads", "2", *flags])
        results["candidates"][name] = {"flags": flags}
    save()
    qrows = ["--train-rows", "0"] if not args.smoke else ["--train-rows", "64"]
    while running and time.time() - t0 < args.deadline:
        time.sleep(2)
        for key, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            secs = round(time.time() - started, 1)
            print(f"[{time.time() - t0:6.1f}s] done {key} rc={proc.returncode} in {secs}s", flush=True)
            if key.startswith("pt_"):
                name = key[3:]
                entry = results["candidates"][name]
                entry["pretrain_rc"], entry["pretrain_s"] = proc.returncode, secs
                stats = work / name / "stats.json"
                if proc.returncode == 0 and stats.is_file():
                    entry["pretrain"] = json.loads(stats.read_text(encoding="utf-8")).get("pretrain")
                    for ft, flags in FINETUNES.items():
                        launch(f"ft_{name}__{ft}", [PY, "scripts/maint/quality.py", *qrows, "--no-baseline", "--data",
                                                    str(data / "chnsenticorp"), "--model", str(work / name / "shipped"),
                                                    "--out", str(work / f"q_{name}_{ft}"), *flags])
                else:
                    entry["pretrain_log_tail"] = (work / f"{key}.log").read_text(errors="replace")[-3000:]
            else:
                name, ft = key[3:].split("__")
                entry = results["candidates"][name].setdefault("quality", {})
                q = work / f"q_{name}_{ft}" / "quality.json"
                if proc.returncode == 0 and q.is_file():
                    r = next(iter(json.loads(q.read_text(encoding="utf-8"))["results"].values()))
                    entry[ft] = {k: r[k] for k in ("accuracy", "macro_f1", "steps", "final_loss", "seconds",
                                                   "max_length", "precision")}
                else:
                    entry[ft] = {"rc": proc.returncode,
                                 "log_tail": (work / f"{key}.log").read_text(errors="replace")[-3000:]}
            save()
    for key, (proc, _) in running.items():  # past the deadline
        proc.kill()
        log = (work / f"{key}.log").read_text(errors="replace")
        results.setdefault("killed_at_deadline", {})[key] = log[-600:]
        print(f"[{time.time() - t0:6.1f}s] killed {key}", flush=True)
    save()

    def score(name: str) -> float:
        q = results["candidates"][name].get("quality", {})
        return sum(q.get(ft, {}).get("accuracy", 0.0) for ft in ("lora_e1", "full_e1"))

    best = sorted((n for n in cands if (work / n / "shipped" / "model.safetensors").is_file()), key=score,
                  reverse=True)[: args.keep]
    results["returned"] = best
    save()
    if best:
        tar = work / "models.tar"
        with tarfile.open(tar, "w") as tf:
            for n in best:
                tf.add(work / n / "shipped", arcname=n)
        subprocess.run(["split", "-b", "15m", "-d", str(tar), str(out / "models.tar.")], check=True)
    logs = work / "logs.txt"  # the end of every log, one file
    with open(logs, "w") as fh:
        for p in sorted(work.glob("*.log")):
            fh.write(f"==== {p.name}\n{p.read_text(errors='replace')[-4000:]}\n")
    (out / "logs.txt").write_text(logs.read_text(), encoding="utf-8")
    print(json.dumps(results, indent=1, ensure_ascii=False)[-6000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
