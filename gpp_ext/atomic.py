"""Files written atomically and read with clear errors: what every output of gpp_ext goes through.

A file is written to a temporary file in its folder (named `.tmp-<pid>-...`, so the writer is known), then
renamed onto its path: a reader never sees half a file, and a crash leaves the previous version. A write the
disk refuses (no space, a size limit, a read-only or foreign folder) raises `OSError` naming the file, with no
partial file left. The temporary
files of writers that were killed are removed by the next write in that folder. `read` loads a torch file with
`weights_only=True` (no code runs from it) and turns torch's many reader errors for a damaged or cut-short file
into one `ValueError` that names it.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile

import torch

__all__ = ["write_atomic", "write_stream_atomic", "write_to", "save_atomic", "write_text_atomic", "read"]

_TMP = ".tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _host() -> str:
    """This machine's name as it goes into temporary file names (letters, digits, '.' and '_')."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"


def _remove_stale(folder: str) -> None:
    """Removes the temporary files (`.tmp-<pid>@<host>-...`) that writers of this machine which no longer run
    left in `folder` (a pid says nothing of another machine's writers on a shared disk: theirs are left alone)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith(_TMP):
            continue
        pid, at, host = name[len(_TMP):].split("-", 1)[0].partition("@")   # "<pid>@<host>" ("<pid>" before)
        if at and host != _host():
            continue   # another machine's writer
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def write_atomic(path, write) -> None:
    """Calls `write(tmp_path)`, then renames the temporary file onto `path`: readers never see half a file.
    Temporary files left in the folder by writers that were killed are removed first."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder)
    # keep the extension: torch.save names its archive after the file, and a bare ".tmp-x" name is refused
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_TMP}{os.getpid()}@{_host()}-",
                               suffix=os.path.splitext(path)[1] or ".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
            _sync(tmp)  # the content on the disk before the rename makes it the file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for everyone to read
            os.replace(tmp, path)
            _sync(folder, directory=True)  # and the rename itself
        except OSError as error:  # no space, a size limit, a read-only disk: named by the file being written
            if error.filename == path:
                raise
            raise OSError(error.errno, f"cannot write it: {error.strerror or error}", path) from error
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sync(path: str, directory: bool = False) -> None:
    """fsync of a file, or of a folder's entries (where the platform and file system allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return   # a folder cannot be opened to sync (Windows): the rename is as durable as the OS makes it
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


class _Sink:
    """A binary file-like writer that keeps the `OSError` a failed write raised: torch's serialisers turn it into
    a `RuntimeError` that says nothing of the disk ("unexpected pos ..."), so the caller re-raises the real one."""

    def __init__(self, fd: int):
        self.fd, self.error = fd, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as error:
            self.error = error
            raise
        return done

    def flush(self) -> None:
        pass


def write_to(fd: int, dump) -> None:
    """`dump(f)` with `f` a binary file-like writer on the open descriptor `fd`, then synced to the disk; a write
    the disk refused raises its `OSError`, whatever the serialiser made of it."""
    sink = _Sink(fd)
    try:
        dump(sink)
    except OSError:
        raise
    except Exception:
        if sink.error is not None:
            raise sink.error from None
        raise
    os.fsync(fd)


def write_stream_atomic(path, dump) -> None:
    """`dump(f)` into a binary file-like `f`, through a temporary file and a rename (as `write_atomic`); a write
    that fails for the disk's sake (full, a size limit, read-only) raises that `OSError`, naming `path`."""
    def write(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_to(fd, dump)
        finally:
            os.close(fd)

    write_atomic(path, write)


def save_atomic(obj, path) -> None:
    """`torch.save(obj, path)` through a temporary file and a rename."""
    write_stream_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text: str) -> None:
    """Writes a text file through a temporary file and a rename."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def read(path, where: str, what: str = "", hint: str = "") -> object:
    """`torch.load(path, weights_only=True)` on the CPU, with a damaged, cut-short or foreign file turned into a
    `ValueError` from `where` naming it (`what` it is, and a `hint` on what to do) instead of torch's reader
    errors (and never torch's advice to load with `weights_only=False`, which would run code the file names)."""
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError, MemoryError):  # not damage: the file is there but cannot be read
        raise
    except FileNotFoundError as error:
        raise ValueError(f"{where}: {what + ' ' if what else ''}{path} does not exist{hint}") from error
    except pickle.UnpicklingError as error:
        named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        if named:  # a whole pickled object (torch.save(model)): code, not data
            found = f"it names {named.group(1)}"
            raise ValueError(f"{where}: refused {what + ' ' if what else ''}{path}: it is a pickled Python object "
                             f"(e.g. torch.save(model)), and loading one runs code it names; save the weights "
                             f"instead (torch.save(model.state_dict(), ...) or gpp_ext.io.save(model, ...)){hint}"
                             + f" ({found})") from error
        raise _unreadable(path, where, what, hint, error) from error
    except Exception as error:  # noqa: BLE001  torch's readers fail on foreign bytes with any error type
        # torch reports a cut-short archive as OSError (EINVAL) or RuntimeError, an empty file as EOFError, a
        # text file as KeyError
        raise _unreadable(path, where, what, hint, error) from error


def _unreadable(path, where: str, what: str, hint: str, error: Exception) -> ValueError:
    """The error for a file torch cannot read: what it probably is, and the reader's own reason in a few words
    (the unpickler's detail, without torch's advice on `weights_only`)."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = (detail.group(1) if detail else text).strip().splitlines()[0][:200] if text.strip() else ""
    return ValueError(f"{where}: cannot read {what + ' ' if what else ''}{path}: it is not a file written by "
                      f"torch.save or gpp_ext.io.save, or it is damaged or incomplete (e.g. a copy that was cut "
                      f"short){hint} ({type(error).__name__}{': ' + reason if reason else ''})")
