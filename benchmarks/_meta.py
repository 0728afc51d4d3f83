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


# what the benchmarks themselves write while they run: a change there is a result, not a change of the code
RESULTS = "benchmarks/results/"


def dirty_paths(porcelain: str) -> list:
    """The changed tracked paths of `git status --porcelain` output, less those under `RESULTS`: a benchmark
    that runs for days rewrites its own records, and those must not mark every later record's commit dirty."""
    paths = []
    for line in porcelain.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path and not path.startswith(RESULTS):
            paths.append(path)
    return paths


def git_commit() -> str:
    """The short commit hash, `-dirty` when tracked files other than the benchmark results have uncommitted
    changes (the code a figure came from is then not that commit's); "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("-dirty" if dirty_paths(status) else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Exclusive:
    """Holds `<path>.lock` while a benchmark writes `path`: a second run on the same results (a `--latency` pass
    or a `--resume` started beside a running one) would overwrite the first one's records with its own, so it
    stops at once with an error naming the running one's pid. The lock is an `flock`, released by the kernel
    however the holder ends."""

    def __init__(self, path: str, who: str):
        self.path, self.who, self._file = path + ".lock", who, None

    def __enter__(self):
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise SystemExit(f"{self.who}: another run (pid {holder}) is writing {self.path[:-5]}; wait for it, or "
                             f"stop it with `kill {holder}` (it saves what it has done) and run again with --resume")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        return False
