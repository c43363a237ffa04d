#!/usr/bin/env bash
# Build .gpu-site/: the Python packages scripts/gpu-check.sh needs on a lent GPU machine that its image lacks
# (no network there; the image has torch with CUDA, transformers, peft, accelerate, safetensors, tokenizers, numpy,
# attrs, anyio, typer...: /work/.library/device/KINDS.md), for its Python 3.12 on x86-64, at the versions this
# checkout is tested with. Run it where PyPI is reachable; the folder is ignored by git and travels with the working
# tree (the device tool's carry: [".gpu-site"]; about 30 MiB of the 64 MiB a call may carry).
#   scripts/gpu-site.sh [PYTHON]    PYTHON: the one whose versions to copy (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
# The platform's own small dependencies, then what its 4-bit training needs (the `qlora` extra of pyproject.toml).
PACKAGES=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
          llguidance jsonschema jsonschema-specifications referencing rpds-py peft)
PINS=$("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import sys, tomllib
from importlib.metadata import version
pins = [f"{name}=={version(name)}" for name in sys.argv[1:]]
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["qlora"]
print(" ".join(pins + extras))
PY
)
rm -rf .gpu-site .gpu-wheels
mkdir -p .gpu-wheels
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for glibc in 2_34 2_31 2_28 2_27 2_24 2_17; do TARGET+=(--platform "manylinux_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64)
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q "${TARGET[@]}" -d .gpu-wheels $PINS
"$PYTHON" -m pip install -q "${TARGET[@]}" --no-compile --target .gpu-site .gpu-wheels/*.whl
rm -rf .gpu-wheels
# bitsandbytes ships a library per CUDA version: keep the image's (CUDA 13) and the CPU one.
find .gpu-site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*_cuda13*' ! -name '*_cpu.so' -delete
du -sh .gpu-site
