#!/bin/sh
# Download, on this machine, the wheels bench/gpu_bench.py needs on the GPU machine and that its image lacks
# (Python 3.12, x86-64; nothing can be fetched there): TRL and datasets (the SFTTrainer baseline; clmtune's data
# preparation imports datasets too), Liger kernels, and FastAPI/uvicorn/pydantic (`clmtune serve`). About 6 MB,
# into .whl/ (git-ignored); the device call names `.whl` in `carry` and bench/gpu_run.sh installs them there.
# Versions: those the CPU test environment runs (pyproject/.venv), one version of each.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.3 \
  uvicorn==0.55.0
ls -la .whl
du -sh .whl
