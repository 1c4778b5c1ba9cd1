"""megalora's trainer on megatron-core: config, loop, checkpoint, generation, the job.

Entry points: ``megalora train CONFIG`` (the CLI) and ``python -m megalora.train
CONFIG`` (what launchers start). See :mod:`megalora.training.job`.
"""

from .config import JobConfig, apply_overrides, from_dict, load
from .job import run

__all__ = ["JobConfig", "apply_overrides", "from_dict", "load", "run"]
