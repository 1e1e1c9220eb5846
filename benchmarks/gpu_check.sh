#!/usr/bin/env bash
# The GPU check of issue 16 as one command on a CUDA machine whose python3 (3.12) already has a CUDA torch, numpy,
# msgpack, safetensors, typer, rich and pytest, and no internet:
#
#   benchmarks/gpu_wheels.sh          # beforehand, on a machine with internet: fills .gpu-wheels/ (about 18 MiB)
#   benchmarks/gpu_check.sh [args]    # on the GPU machine, from the repository root; args go to gpu_check.py
#
# It installs the carried wheels and tmrl's packages (built by gpu_wheels.sh) with --no-deps and --no-index into
# .gpu-site/ (pip --target; no torch is installed, so the machine's CUDA torch is the one used), puts that folder
# first on PYTHONPATH and its bin/ (tmrl-relay, tmrl-trainer, tmrl-worker) on PATH, where the stack launcher finds
# them. A virtual environment would not do: that machine's python3 is itself a virtual environment, and a venv made
# from it sees the base interpreter's packages, not its torch. Then it runs the CUDA-only tests (they skip on
# machines without CUDA; set GPU_CHECK_TESTS=0 to leave them out), and benchmarks/gpu_check.py, whatever the tests
# said. Exit status: gpu_check.py's (2: no CUDA device), or 3 when it passed but a test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=.gpu-site
if [ ! -d .gpu-wheels ]; then
  echo "gpu_check.sh: .gpu-wheels/ is missing; run benchmarks/gpu_wheels.sh on a machine with internet first" >&2
  exit 1
fi
rm -rf "$site"
"$python" -m pip install --quiet --no-deps --no-index --no-compile --no-cache-dir --target "$site" \
  .gpu-wheels/*.whl .gpu-wheels/project/*.whl
export PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/$site/bin:$PATH" PYTHONUNBUFFERED=1
"$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
tests=0
if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
  # the cuda-graph backend against the reference, the device mirror, device selection: every test named for CUDA
  "$python" -m pytest -q -p no:cacheprovider --tb=short -k cuda tests/trainer/test_learner_backends.py \
    tests/trainer/test_device_replay.py tests/trainer/test_guard.py tests/trainer/test_sac.py tests/trainer/test_n_step.py \
    || tests=$?
fi
status=0
"$python" benchmarks/gpu_check.py "$@" || status=$?
if [ "$status" = 0 ] && [ "$tests" != 0 ]; then
  echo "gpu_check.sh: the CUDA tests failed (exit status $tests; above)" >&2
  status=3
fi
exit "$status"
