#!/usr/bin/env bash
# The environment `make quickstart` and `make test` run in: $VENV (made if missing), PyTorch, then
# lorasurgeon in editable mode with the references its tests compare against ([test]).
#
# PyTorch: kept if the environment has it. Otherwise a wheel already on this machine (pip's find-links)
# is taken first, then the CPU build from PyTorch's own index — unless an NVIDIA GPU is present
# (nvidia-smi answers), where PyPI's default build (with CUDA) is the right one. TORCH_SPEC pins another.
set -euo pipefail
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
pip=("$venv/bin/python" -m pip install --quiet)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "$torch_spec"
  elif ! "${pip[@]}" --no-index "$torch_spec" 2>/dev/null; then
    "${pip[@]}" "$torch_spec" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e '.[test]'
"$venv/bin/python" -c "import torch, lorasurgeon; print(f'setup: lorasurgeon {lorasurgeon.__version__}, torch {torch.__version__} in $venv')"
