#!/usr/bin/env bash
# Wheels for a GPU machine without network whose image has torch 2.11 on Python 3.12 but lacks diffusers, peft,
# PyWavelets, torchao and deepspeed (and what they need beyond that image). Run here, from any directory:
#     bash bench/gpu_wheels.sh            # -> .whl/ at the repository root (ignored by git), about 20 MB
# Then on the GPU machine, from the repository root, with .whl carried along:
#     python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site && python3 -m bench.gpu_sweep --out "$OUT"
# Versions are the ones this machine's environment runs the tests with; torchao 0.18 is built against torch 2.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl  # in .gitignore
mkdir -p "$DEST"

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# Pure-Python and manylinux wheels, for CPython 3.12 on x86-64, without their dependencies (named one by one).
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" \
  "diffusers==$(version diffusers)" "peft==$(version peft)" "PyWavelets==$(version PyWavelets)" \
  "torchao==0.18.0" "importlib_metadata==$(version importlib_metadata)" \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic_core==$(version pydantic_core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"

# DeepSpeed ships as source: build its pure-Python wheel here (no ops prebuilt: they compile on first use on the GPU
# machine, whose image has nvcc and ninja; the CPU Adam of ZeRO-2 offload takes about a minute there the first time).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -la "$DEST"
du -sh "$DEST"
