#!/usr/bin/env bash
# Wheels the GPU check needs beside the GPU machine's own PyTorch (Python 3.12, x86-64, no network
# there): diffusers, torchao, gguf (the formats section's GGUF layout) and pydantic. Run here, from
# the repository root; they land in .whl/ (ignored by git), which the device call carries. See
# bench/README.md for the one command.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  diffusers==0.42.1 torchao==0.18.0 gguf==0.19.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 importlib_metadata==10.2.0 zipp==4.1.2
ls -1 .whl
