"""Input factories shared by the tests and the benchmarks, so both exercise the same data.

Everything is seeded and built locally (the `digits` set ships with scikit-learn); nothing is downloaded.
"""

from __future__ import annotations

import torch


def make_features(n: int, d: int, num_classes: int, *, mean: float = 0.0, spread: float = 3.0,
                  dtype=torch.float32, seed: int = 0, device="cpu", relu: bool = False):
    """Labelled features `x [n, d]`, `y [n]` with separated class centres and unit within-class noise.

    `mean` offsets every feature (e.g. 1e4 to test cancellation); `relu=True` clips at 0 like post-ReLU
    activations (then some neurons may be dead). Every class is present when `n >= num_classes`.
    """
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64) + mean
    if relu:
        x = x.clamp_min(0.0)
    return x.to(dtype=dtype, device=device), y.to(device)


def make_scatter_pair(d: int, batch=(), *, rank: int | None = None, seed: int = 0, dtype=torch.float64,
                      device="cpu"):
    """A symmetric PSD `a` of rank `rank` (like a between-class scatter, default `d`) and a well-conditioned
    symmetric positive definite `b` (like a within-class scatter), each `[*batch, d, d]`."""
    g = torch.Generator().manual_seed(seed)
    rank = d if rank is None else rank
    fa = torch.randn(*batch, d, rank, generator=g, dtype=torch.float64)
    fb = torch.randn(*batch, d, 2 * d + 8, generator=g, dtype=torch.float64)
    a = fa @ fa.mT
    b = fb @ fb.mT / (2 * d + 8)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def make_conv_case(batch: int, c_in: int, c_out: int, size: int, kernel: int, *, stride: int = 1,
                   padding: int = 0, dilation: int = 1, groups: int = 1, dims: int = 2, seed: int = 0,
                   dtype=torch.float32, device="cpu"):
    """A convolution's weight, an input shape and a signal at its output, for deconv_backproject.

    Returns `(signal, weight, input_shape)` where `signal` has the shape the forward convolution would
    produce from `input_shape`.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, *([kernel] * dims), generator=g)
    input_shape = (batch, c_in, *([size] * dims))
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    signal = torch.randn(batch, c_out, *([out] * dims), generator=g).relu()
    return signal.to(dtype=dtype, device=device), weight.to(dtype=dtype, device=device), input_shape


def digits(dtype=torch.float32):
    """scikit-learn's 8x8 handwritten digits: `x [1797, 64]` pixel intensities 0..16, `y [1797]` in 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.as_tensor(data.data, dtype=dtype), torch.as_tensor(data.target, dtype=torch.long)


def rel_err(a, b) -> float:
    """Relative Frobenius error of `a` against `b`, in float64 (a zero `b` counts as norm 1e-300)."""
    a = torch.as_tensor(a, dtype=torch.float64).detach().cpu()
    b = torch.as_tensor(b, dtype=torch.float64).detach().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (for a test's process group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _process_main(rank: int, fn, world_size: int, port: int, backend: str, timeout: float, args,
                  done_dir: str) -> None:
    import datetime
    import gc
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world_size, *args)
        gc.collect()  # objects holding the group (a DDP reducer in a reference cycle) go while it still works
        dist.barrier()  # leave together (see gpp_ext.cli: a gloo peer leaving early can abort the others)
        open(os.path.join(done_dir, str(rank)), "w").close()  # every rank's work is done
    finally:
        dist.destroy_process_group()


def run_processes(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0) -> None:
    """Runs `fn(rank, world_size, *args)` in `world_size` fresh processes joined in a `torch.distributed`
    process group on 127.0.0.1 (a free port), and waits for them. `fn` must be importable (a module-level
    function). A failing process raises here with its traceback; processes still running after `timeout`
    seconds are killed and `TimeoutError` is raised, so a hung collective cannot hang the caller.

    A process killed by a signal after every rank finished `fn` and the closing barrier, that is while gloo tears
    its connections down, only warns: torch 2.13's gloo can abort there ("terminate called without an active
    exception": seen once in CI on a 2-core machine, not again in 60 runs under load) when the work and its
    outputs are complete. A signal before that point still raises."""
    import os
    import tempfile
    import time
    import warnings

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="gpp-ranks-") as done_dir:
        context = mp.start_processes(_process_main, nprocs=world_size, join=False, start_method="spawn",
                                     args=(fn, world_size, free_port(), backend, timeout, args, done_dir))
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_processes: {world_size} processes still running after {timeout:g} s")
        except mp.ProcessExitedException as e:
            if e.signal_name is None or len(os.listdir(done_dir)) < world_size:
                raise
            warnings.warn(f"run_processes: rank {e.error_index} died of {e.signal_name} while leaving the process "
                          "group, after every rank had finished its work", RuntimeWarning, stacklevel=2)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


def digits_image_folder(folder, per_class: int | None = None, size: int = 16, layout: str = "flat",
                        rgb: bool = False) -> str:
    """Writes scikit-learn's 8x8 digits as PNG files, one sub-folder per class (`folder/<digit>/<i>.png`; with
    `layout="splits"`, `folder/train/<digit>/` and `folder/test/<digit>/`, a fifth of each class in test),
    upscaled to `size` pixels: a small, real image folder for trying `--data imagefolder:` and for the tests.
    Returns the folder. `per_class` caps the images written per class (default: all, ~180)."""
    import os

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if layout not in ("flat", "splits"):
        raise ValueError(f"digits_image_folder: layout must be 'flat' or 'splits', got {layout!r}")
    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
    folder = os.fspath(folder)
    for digit in range(10):
        index = np.flatnonzero(data.target == digit)[:per_class]
        cut = len(index) - max(1, len(index) // 5)
        for k, i in enumerate(index):
            split = ("train" if k < cut else "test") if layout == "splits" else ""
            target = os.path.join(folder, split, str(digit))
            os.makedirs(target, exist_ok=True)
            im = Image.fromarray(images[i], mode="L").resize((size, size), Image.NEAREST)
            (im.convert("RGB") if rgb else im).save(os.path.join(target, f"{i:04d}.png"))
    return folder


def run_cli(*args, cwd=None, process: bool = False, timeout: float = 600, preexec_fn=None):
    """`gpp ARGS` as a `subprocess.CompletedProcess` (returncode, stdout, stderr). By default in this process
    through `gpp_ext.cli.main`: the same code the `gpp` command runs, without the few seconds a fresh interpreter
    spends importing torch; the thread count, the working folder and the warning filters are restored after it.
    `process=True` (or a `preexec_fn`, e.g. a resource limit) runs `python -m gpp_ext.cli` in a child process
    instead: for what only a real process shows (the entry point itself, limits, signals, a concurrent run);
    `timeout` (seconds) bounds the child process only."""
    import contextlib
    import io
    import os
    import subprocess
    import sys
    import warnings

    args = [str(a) for a in args]
    if process or preexec_fn is not None:
        return subprocess.run([sys.executable, "-m", "gpp_ext.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, preexec_fn=preexec_fn)
    from . import cli

    out, err = io.StringIO(), io.StringIO()
    threads, folder = torch.get_num_threads(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")   # as a fresh process shows them: each once per place
            try:
                code = cli.main(args)
            except SystemExit as stop:   # argparse's errors and --help
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if not isinstance(stop.code, (int, type(None))):
                    print(stop.code, file=sys.stderr)
    finally:
        os.chdir(folder)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["gpp", *args], code, out.getvalue(), err.getvalue())
