"""What every multi-rank pool worker imports, loaded once in the pool's fork server.

The workers are forked from a server process that has imported these, so a
worker starts in a fraction of a second instead of importing torch,
megatron-core and torch's dynamo (which the first ``torch.optim`` optimizer
pulls in) again: seconds of CPU each, for every worker of every pool and every
respawn. Importing does no parallel work and starts no thread, so forking
afterwards is safe; the workers set up gloo, threads and the environment
themselves.
"""

import warnings

# Printed by every megatron import on CPU: noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401 - what Optimizer.__init__ imports on first use
import torch.distributed  # noqa: E402,F401

from megalora import cpu_compat  # noqa: E402,F401
import megatron.core  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401

from tests import worker_state  # noqa: E402,F401

import gc  # noqa: E402

# Imported modules live as long as the worker: the collector need not walk them again (each worker
# collects after every task, and megalora's destroy_parallel after each layout).
gc.freeze()
