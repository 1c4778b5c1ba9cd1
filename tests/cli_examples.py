"""Every example command the CLI's ``--help`` and the READMEs print, parsed out of them.

A new example is picked up automatically; :func:`kind` must then know how
it is exercised, or the coverage test fails naming it.
"""

from __future__ import annotations

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", "launch/README.md")


def help_examples() -> list[tuple[str, str]]:
    """``(where, command)`` of the ``examples:`` lines of every verb's ``--help``."""
    from megalora.cli import VERBS, build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    out = []
    for verb in VERBS:
        epilog = sub[verb].epilog or ""
        body = epilog.split("examples:", 1)[1] if "examples:" in epilog else ""
        for line in body.splitlines():
            if re.match(r"^  (megalora|torchrun|python) ", line):
                out.append((f"megalora {verb} --help", _strip_comment(line.strip())))
    return out


def readme_examples() -> list[tuple[str, str]]:
    """``(where, command)`` of the shell lines in the READMEs' bash blocks (continuations joined)."""
    out = []
    for name in READMES:
        with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
            blocks = re.findall(r"```bash\n(.*?)```", handle.read(), flags=re.S)
        for block in blocks:
            for command in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = _strip_comment(command.strip())
                if command:
                    out.append((name, command))
    return out


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line) if not line.startswith("#") else ""


def all_examples() -> list[tuple[str, str]]:
    return help_examples() + readme_examples()


def kind(command: str) -> str:
    """How the suite exercises ``command``; ``""`` if it does not know (a new kind of example)."""
    if "launch/pretrain_gpt_lora.py" in command:
        return "megatron-lm"  # needs a GPU and a Megatron-LM checkout; the plug-in: tests/integrations/test_megatron_lm.py
    words = shlex.split(command)
    if command.startswith("bash launch/setup.sh && "):
        return kind(command[len("bash launch/setup.sh && "):])  # setup itself: .ci/run, on a fresh machine
    if words[:2] == [".", ".venv/bin/activate"]:
        return "suite" if "pytest" in words else ""
    if words[0] in ("megalora", ".venv/bin/megalora"):
        return "megalora"
    if words[0] == "torchrun" and "megalora.train" in words:
        return "torchrun"
    if words[0] == "launch/torchrun.sh":
        return "torchrun.sh"
    if re.match(r"^NP=\d+ ", command) and "launch/mpirun.sh" in words:
        return "mpirun.sh"  # tests/cli/test_launch_scripts.py runs it at NP=2; larger ones: config checks here
    if words[0] == "sbatch":
        return "sbatch"  # tests/cli/test_launch_scripts.py runs both scripts under srun/scontrol stand-ins
    if words[0] in ("git", "export") and "Megatron-LM" in command:
        return "megatron-lm"
    if re.match(r"^MEGATRON_LM_PATH=\S+ python -m pytest tests/\S+\.py$", command):
        # The optional real Megatron-LM run: collected (skipped without a checkout) by the suite itself.
        return "megatron-lm-test"
    return ""


def config_and_overrides(command: str) -> tuple[str, list[str]]:
    """The config file and ``section.key=value`` overrides an example passes."""
    words = shlex.split(command)
    config = next(w for w in words if w.startswith("configs/") and w.endswith(".yaml"))
    return config, [w for w in words if re.match(r"^[a-z_]+\.[a-z_.]+=", w)]
