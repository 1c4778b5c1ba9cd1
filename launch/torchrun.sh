#!/usr/bin/env bash
# One node: start the ranks of a megalora job with torchrun.
#
#   launch/torchrun.sh configs/smollm2_cpu.yaml                 # 3 processes (parallel.tp x parallel.pp)
#   NPROC=4 launch/torchrun.sh configs/tiny_gpt.yaml train.steps=50   # 2-way TP x 2-way data parallel
#
# NPROC defaults to parallel.tp x parallel.pp of the config (after overrides),
# i.e. no data parallelism. `megalora train CONFIG` does the same self-launch.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
# The repository's .venv interpreter when there is one (no need to activate it), else python3 on PATH.
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3 || echo python); fi
fi
NPROC=${NPROC:-$("$PYTHON" -c 'import sys
from megalora.training import load
print(load(sys.argv[1], sys.argv[2:]).model_parallel_size())' "$CONFIG" "$@")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}          # ranks share the cores
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m megalora.train "$CONFIG" "$@"
