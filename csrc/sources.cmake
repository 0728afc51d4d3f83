# The one list of C++/CUDA sources. CMakeLists.txt includes this file and setup.py parses it, so the two
# builds cannot drift apart. Keep one `set(NAME path...)` per list, paths relative to the repository root.

# Operator schemas (TORCH_LIBRARY) and shared code: every build.
set(GPP_EXT_COMMON_SOURCES
    csrc/schema.cpp
)

# CPU kernels (TORCH_LIBRARY_IMPL(gpp_ext, CPU, m)): every build.
set(GPP_EXT_CPU_SOURCES
    csrc/cpu/class_scatter_cpu.cpp
    csrc/cpu/merge_scatter_cpu.cpp
    csrc/cpu/generalized_eigh_cpu.cpp
    csrc/cpu/discriminants_cpu.cpp
    csrc/cpu/utility_cpu.cpp
    csrc/cpu/deconv_backproject_cpu.cpp
    csrc/cpu/slice_channels_cpu.cpp
)

# CUDA kernels (TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m)): only when GPP_EXT_CUDA resolves to on.
set(GPP_EXT_CUDA_SOURCES
    csrc/cuda/class_scatter_cuda.cu
    csrc/cuda/merge_scatter_cuda.cu
    csrc/cuda/generalized_eigh_cuda.cpp
    csrc/cuda/discriminants_cuda.cpp
    csrc/cuda/utility_cuda.cu
    csrc/cuda/deconv_backproject_cuda.cpp
    csrc/cuda/slice_channels_cuda.cu
)

# The Python binding (PYBIND11_MODULE): build information only; the ops live in the dispatcher.
set(GPP_EXT_PYTHON_SOURCES
    csrc/gpp_ext.cpp
)
