"""What every benchmark record states beside its figures: the machine and the commit it ran on."""

from __future__ import annotations

import os
import subprocess

from gpp_ext.latency import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    """`<cpu model>, <n> threads`: the machine a timing or an accuracy came from."""
    import torch

    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """The short commit hash, `-dirty` when tracked files have uncommitted changes; "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
