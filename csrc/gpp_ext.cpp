// The Python extension module gpp_ext._C. Importing it loads the shared library, whose static initialisers
// register the ops with the PyTorch dispatcher (torch.ops.gpp_ext.*). The module itself only reports how it
// was built; tensor ops are never bound through pybind11, so autograd, torch.compile and opcheck see them.
#include <torch/extension.h>
#include <torch/version.h>

#ifdef GPP_EXT_WITH_CUDA
#include <cuda.h>
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["torch"] = TORCH_VERSION;  // the torch headers this module was compiled against
#ifdef GPP_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpp_ext compiled core: kernels are registered as torch.ops.gpp_ext.*";
  m.def("build_info", &build_info, "How this extension module was compiled.");
}
