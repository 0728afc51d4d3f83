"""A run's output folder: its checkpoint, the run's identity, and the rules for starting, resuming and
replacing a run, so that a folder holding a run is never overwritten silently and a resume never mixes two
runs.

The checkpoint records the run's identity (`run_identity`: the model's spec or module layout, the data's name,
input shape, classes, split sizes and a digest of the training labels) and its configuration; resuming with
anything else is refused with the differences listed. Under `torch.distributed` rank 0 reads and decides, and a
refusal is raised on every process (`on_lead`), so no process is left waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to the pid in the lock file
    fcntl = None

import torch
import torch.nn as nn

from . import distributed as gdist
from .atomic import read, save_atomic, write_atomic
from .data import labels_of
from .models.sources import spec_of

__all__ = ["RunFolder", "run_identity", "on_lead", "differences", "folder_lock", "CHECKPOINT_FORMAT",
           "RUN_FILES", "LOCK_FILE"]

CHECKPOINT_FORMAT = "gpp_ext.loop/2"
# Every file a run writes in its folder (the checkpoint, then the reports and the compact model).
RUN_FILES = ("checkpoint.pt", "report.json", "report.md", "progress.png", "model.pt")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_identity(model: nn.Module, splits) -> dict:
    """What a run is about, recorded in its checkpoint so that a resume can refuse another run's folder: the
    model (its factory spec, else its modules' names and types) and the data (name, input shape, classes, split
    sizes, a digest of the training labels, and how raw inputs become model inputs, e.g. `--image-norm`). The
    weights are not part of it: a resumed run continues from the checkpoint's model, whatever the caller built."""
    spec = model.spec() if callable(getattr(model, "spec", None)) else None
    layout = ";".join(f"{name}:{type(m).__name__}" for name, m in model.named_modules())
    labels = labels_of(splits.train).to(torch.int64).contiguous().numpy().tobytes()
    if not spec and spec_of(model):  # a sourced model: its spec is the unpruned architecture, so add the widths
        shapes = ";".join(f"{k}:{list(v.shape)}" for k, v in model.state_dict().items())
        spec = {**spec_of(model), "shapes": _sha(shapes.encode())}
    preprocessing = getattr(splits, "preprocessing", None)
    return {"model": json.loads(json.dumps(spec)) if spec else {"modules": _sha(layout.encode())},
            "data": {"name": splits.name, "input_shape": list(splits.input_shape), "classes": list(splits.classes),
                     "sizes": [len(splits.train), len(splits.val), len(splits.test)], "train_labels": _sha(labels)},
            "inputs": {"preprocessing": json.loads(json.dumps(preprocessing)) if preprocessing else None}}


def differences(saved: dict, current: dict, prefix: str = "") -> list:
    """`["key: saved -> current", ...]` for every leaf where two nested dicts differ."""
    out = []
    for key in sorted(set(saved) | set(current), key=lambda k: (k != "name", str(k))):  # names first
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def on_lead(fn):
    """`fn()` computed on rank 0 and shared with every process; a `ValueError` there is raised everywhere (so a
    refusal stops the whole job instead of leaving the other processes waiting)."""
    result = None
    if gdist.rank() == 0:
        try:
            result = fn()
        except ValueError as error:
            result = error
    result = gdist.broadcast_object(result)
    if isinstance(result, ValueError):
        raise result
    return result


LOCK_FILE = ".gpp-run.lock"
_HELD: dict = {}  # lock path -> [open file, depth] for the locks this process holds (re-entrant)


def _owner(path: str) -> dict:
    """What a lock file says of its holder (`{"pid", "host", "started"}`), or {} while it is being written."""
    try:
        with open(path) as f:
            found = json.load(f)
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def folder_lock(folder: str, where: str = "GrowPushPrune"):
    """Holds the advisory lock of run folder `folder` (made if need be) for the block: one run per folder.

    The lock is an exclusive `flock` on `folder/.gpp-run.lock`, a file that names the holder (pid, host, start
    time). The kernel releases a lock whose process died, so a lock file left by a killed run is stale and is
    simply taken over; a live holder makes this raise `ValueError` naming the folder and its pid and host, at
    once (no waiting). Re-entrant within a process. A folder this call made is removed again when the block
    ends with nothing written in it (a run refused before its first checkpoint leaves no trace).
    """
    folder = os.fspath(folder)
    path = os.path.abspath(os.path.join(folder, LOCK_FILE))
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{where}: cannot write to the output folder {folder} ({error.strerror or error}); choose "
                         f"another folder (--out)") from error
    handle = _acquire(path, folder, where)
    _HELD[path] = [handle, 1]
    try:
        yield
    finally:
        del _HELD[path]
        try:
            os.unlink(path)  # while still locked, so no other run can be holding this file
        except OSError:
            pass
        _release(handle)
        if created:
            try:
                os.rmdir(folder)  # only when empty: nothing was written
            except OSError:
                pass


def _acquire(path: str, folder: str, where: str):
    while True:
        try:
            handle = open(path, "a+")
        except OSError as error:
            raise ValueError(f"{where}: cannot write to the output folder {folder} ({error.strerror or error}); "
                             f"choose another folder (--out)") from error
        try:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif os.path.getsize(path) and _alive_owner(_owner(path)):  # no flock (Windows): trust the pid
                raise BlockingIOError
        except BlockingIOError:
            handle.close()
            owner = _owner(path)
            holder = (f"process {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}" if owner
                      else "another process")
            raise ValueError(f"{where}: {folder} is in use by another run ({holder}); wait for it to end or choose "
                             f"another folder (--out). Two runs in one folder would overwrite each other's "
                             f"checkpoint and reports") from None
        try:  # a holder that unlinked the file as we opened it: our lock is on a file no one else sees
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        _release(handle)
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, handle)
    handle.flush()
    return handle


def _alive_owner(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return bool(owner)
    from .atomic import _alive

    return _alive(owner["pid"])


def _release(handle) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


class RunFolder:
    """The output folder `out_dir` of the run whose identity is `identity` (`run_identity(model, splits)`)."""

    def __init__(self, out_dir: str, identity: dict, where: str = "GrowPushPrune"):
        self.out_dir, self.identity, self.where = os.fspath(out_dir), identity, where
        self.checkpoint = os.path.join(self.out_dir, "checkpoint.pt")

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder's run lock (`folder_lock`) for the block. Under `torch.distributed` rank 0 takes it
        and a refusal is raised on every process."""
        with contextlib.ExitStack() as stack:
            on_lead(lambda: stack.enter_context(folder_lock(self.out_dir, self.where)) and None)
            yield

    def check_writable(self) -> None:
        """The folder exists (made if need be) and is writable: a probe file is written and removed (on rank 0)."""
        def check():
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                write_atomic(os.path.join(self.out_dir, ".write-check"), lambda tmp: open(tmp, "w").close())
                os.unlink(os.path.join(self.out_dir, ".write-check"))
            except OSError as error:
                raise ValueError(f"{self.where}: cannot write to the output folder {self.out_dir} "
                                 f"({error.strerror or error}); choose another folder (--out)") from error

        on_lead(check)

    def save(self, config: dict, state: dict, model_payload: dict) -> None:
        """Writes the checkpoint atomically (rank 0 only)."""
        if gdist.rank() == 0:
            save_atomic({"format": CHECKPOINT_FORMAT, "identity": self.identity, "config": config, "state": state,
                         "model": model_payload}, self.checkpoint)

    def _read(self) -> dict:
        data = read(self.checkpoint, self.where, "the checkpoint", hint="; restore it, or start the run again with "
                    "overwrite=True (--overwrite), which deletes it")
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{self.where}: {self.checkpoint} is not a gpp_ext loop checkpoint of format "
                             f"{CHECKPOINT_FORMAT} (found {found!r}); start the run again with overwrite=True "
                             f"(--overwrite) or use another folder")
        return data

    def resume(self, config: dict, defaults: dict) -> dict | None:
        """The checkpoint's content (`{"state", "model", ...}`), or None when the folder has none; refused when it
        belongs to another run or was written with other settings than `config`. Settings added since it was
        written read as their `defaults` (what that run used). Rank 0 reads it and shares it, so the other
        processes need not see the folder."""
        data = on_lead(lambda: self._read() if os.path.exists(self.checkpoint) else None)
        if data is None:
            return None
        saved = data.get("identity", {})
        # a checkpoint written before the input scaling was recorded is compared on what it recorded
        found = differences(saved, {k: v for k, v in self.identity.items() if k in saved or k != "inputs"})
        if found:
            raise ValueError(f"{self.where}: {self.checkpoint} belongs to another run (" + "; ".join(found[:4])
                             + "); resume with the model and data it was started with, or use another folder")
        found = differences({**defaults, **data["config"]}, config)
        if found:
            raise ValueError(f"{self.where}: {self.checkpoint} was written with other settings ("
                             + "; ".join(found[:4]) + "); resume with the same settings or use another folder")
        return data

    def _existing(self) -> list:
        return on_lead(lambda: [n for n in RUN_FILES if os.path.exists(os.path.join(self.out_dir, n))])

    def refuse_existing(self) -> None:
        """`ValueError` when the folder holds a run's files (a new run there needs resume or overwrite)."""
        existing = self._existing()
        if existing:
            raise ValueError(f"{self.where}: {self.out_dir} holds a run already ({', '.join(existing)}); continue "
                             f"it with resume=True (--resume), replace it with overwrite=True (--overwrite), or "
                             f"choose another folder")

    def start_fresh(self, overwrite: bool) -> None:
        """Makes room for a new run: refused when the folder holds another run's files, unless `overwrite`,
        which deletes them first (so old reports never sit beside a new checkpoint)."""
        if not overwrite:
            self.refuse_existing()
        existing = self._existing()
        if gdist.rank() == 0:
            for name in existing:
                os.unlink(os.path.join(self.out_dir, name))
