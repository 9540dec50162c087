#!/bin/sh
# The command of the device call (bench/README.md, "GPU"): installs the wheels carried in .whl/ (bench/gpu_wheels.sh)
# into /tmp/site, prints the versions that matter, and runs bench/gpu_bench.py with its JSON and log under $OUT.
# Extra arguments go to gpu_bench.py (e.g. --only tut_tutorial,tut_clmtune_bf16 for a rerun of some).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu_run: installing the carried wheels failed; TRL and serve will be recorded as skipped"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_run: no .whl/ carried (bench/gpu_wheels.sh): TRL and serve will be recorded as skipped"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, transformers, peft, accelerate, pyarrow, fsspec, huggingface_hub as h; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'hub', h.__version__)"
python3 -c "import datasets, trl; print('datasets', datasets.__version__, 'trl', trl.__version__)" || echo "gpu_run: datasets/trl do not import"
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
