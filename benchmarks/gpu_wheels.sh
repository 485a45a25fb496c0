#!/usr/bin/env bash
# The wheels a GPU machine without network access needs for benchmarks/gpu_all.py beyond its own image
# (torch, triton, pytest, pyyaml, tokenizers, tqdm are assumed there): DeepSpeed with the dependencies such an
# image usually lacks, and Liger-Kernel (a peer in the fused linear cross-entropy benchmark). Run it where
# PyPI is reachable; it fills .whl/ (git-ignored), which travels with the repository to the GPU machine,
# where gpu_all.py installs what is missing with `pip install --no-index`. For Python 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# DeepSpeed is an sdist: built here without its C++ ops (they are built just in time where needed).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    liger-kernel==0.8.5
ls -la .whl
du -sh .whl
