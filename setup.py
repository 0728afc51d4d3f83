"""Build of gpp_ext and its compiled core gpp_ext._C.

Install into an environment that already has the torch you will run with (the extension is ABI-bound to it):

    pip install --no-build-isolation .        # or -e . for development

Switches (environment variables):
    GPP_EXT_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch has CUDA and nvcc is found;
                            1: require them (fails without a CUDA toolkit); 0: CPU only.
    TORCH_CUDA_ARCH_LIST    GPU architectures for the CUDA kernels (default: 8.0;9.0).
    MAX_JOBS                parallel compile jobs (ninja).
    GPP_EXT_DEBUG=1         -O0 -g instead of -O3.
"""

import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_source_lists(path=os.path.join(ROOT, "csrc", "sources.cmake")):
    """Parse the `set(NAME path ...)` lists shared with CMakeLists.txt."""
    with open(path) as f:
        text = re.sub(r"#[^\n]*", "", f.read())
    return {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)([^)]*)\)", text)}


def resolve_cuda(mode, torch_cuda, cuda_home):
    """Decide whether to compile the CUDA kernels; `mode` is the GPP_EXT_CUDA switch."""
    mode = (mode or "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: GPP_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    nvcc = cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if mode == "1":
        if not torch_cuda:
            sys.exit("setup.py: GPP_EXT_CUDA=1 but this torch has no CUDA support; install a CUDA build of torch")
        if not nvcc:
            sys.exit("setup.py: GPP_EXT_CUDA=1 but no nvcc was found; set CUDA_HOME to the CUDA toolkit")
        return True
    return bool(torch_cuda and nvcc)


def extensions():
    import torch
    from torch.utils import cpp_extension

    lists = read_source_lists()
    with_cuda = resolve_cuda(os.environ.get("GPP_EXT_CUDA"), torch.version.cuda, cpp_extension.CUDA_HOME)
    sources = (lists["GPP_EXT_COMMON_SOURCES"] + lists["GPP_EXT_CPU_SOURCES"]
               + lists["GPP_EXT_PYTHON_SOURCES"])
    debug = os.environ.get("GPP_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # ATen's parallel_for is header-inlined OpenMP: without -fopenmp our kernels would run on one thread.
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]  # the C++ standard: torch's own choice
    args = {"cxx": cxx}
    macros = []
    if with_cuda:
        sources += lists["GPP_EXT_CUDA_SOURCES"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        args["nvcc"] = opt + ["--expt-relaxed-constexpr"]
        macros.append(("GPP_EXT_WITH_CUDA", "1"))
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    print(f"gpp_ext build: torch {torch.__version__}, cuda kernels {'on' if with_cuda else 'off'} "
          f"(GPP_EXT_CUDA={os.environ.get('GPP_EXT_CUDA', 'auto')}, CUDA_HOME={cpp_extension.CUDA_HOME}), "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, {'debug' if debug else 'release'}, "
          f"{len(sources)} sources", flush=True)
    return [kind("gpp_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros,
                 extra_compile_args=args, extra_link_args=["-fopenmp"])], cpp_extension.BuildExtension


def main():
    ext_modules, build_ext = extensions()
    setup(
        packages=find_packages(include=["gpp_ext", "gpp_ext.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
