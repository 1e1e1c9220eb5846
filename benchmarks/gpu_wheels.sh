#!/usr/bin/env bash
# Download, on a machine with internet access, the cp312 manylinux wheels that the GPU machine lacks, into
# .gpu-wheels/ (git-ignored), and build tmrl's own five packages as wheels into .gpu-wheels/project/ (the GPU machine
# has no hatchling to build them; rerun this after changing the code). The GPU machine has python3.12 with a CUDA torch, numpy, msgpack, safetensors, typer,
# rich and onnxruntime, and nothing can be downloaded there: benchmarks/gpu_check.sh installs these with --no-deps.
# Each package is named with the dependencies it needs at import time (pip resolves nothing, so that torch, numpy
# and the machine's other packages are never downloaded again). Total: about 17 MiB (keep it under 64 MiB: it
# travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-wheels
mkdir -p "$out"
pip=${PIP:-.venv/bin/python -m pip}
packages=(  # the versions the CPU install's tests and benchmarks ran with
  # tmrl-common, relay, trainer (torch.utils.tensorboard needs tensorboard and protobuf), worker (sim: pillow, rtgym)
  pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-extensions==4.16.0
  typing-inspection==0.4.5 prometheus-client==0.26.0 gymnasium==1.4.0 cloudpickle==3.1.3 farama-notifications==0.0.6
  rtgym==0.16 pillow==13.0.0 tensorboard==2.21.0 protobuf==7.36.2 absl-py==2.5.1 packaging==26.4
  # the peer
  stable-baselines3==2.9.2
)
$pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$out" "${packages[@]}"
rm -rf "$out/project"
$pip wheel --quiet --no-deps --no-build-isolation -w "$out/project" \
  ./libs/common ./libs/stack ./services/relay ./services/worker ./services/trainer
ls -1 "$out" "$out/project"
du -sh "$out"
