#!/usr/bin/env bash
# The GPU check of issue 16 as one command on a CUDA machine whose python3 (3.12) already has a CUDA torch, numpy,
# msgpack, safetensors, typer and rich, and no internet:
#
#   benchmarks/gpu_wheels.sh          # beforehand, on a machine with internet: fills .gpu-wheels/ (about 17 MiB)
#   benchmarks/gpu_check.sh [args]    # on the GPU machine, from the repository root; args go to gpu_check.py
#
# It makes .gpu-venv, a virtual environment *with the system site packages* (so the machine's CUDA torch is the one
# used; no torch is installed), installs the carried wheels and tmrl's packages (built by gpu_wheels.sh) into it
# with --no-deps and --no-index, then runs benchmarks/gpu_check.py. The console scripts (tmrl-relay, tmrl-trainer, tmrl-worker) land next to its
# python, where the stack launcher looks for them. Exit status 2: no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -d .gpu-wheels ]; then
  echo "gpu_check.sh: .gpu-wheels/ is missing; run benchmarks/gpu_wheels.sh on a machine with internet first" >&2
  exit 1
fi
"$python" -m venv --system-site-packages --without-pip .gpu-venv
venv=.gpu-venv/bin/python
"$venv" -m pip install --quiet --no-deps --no-index --force-reinstall .gpu-wheels/*.whl .gpu-wheels/project/*.whl
"$venv" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
exec "$venv" benchmarks/gpu_check.py "$@"
