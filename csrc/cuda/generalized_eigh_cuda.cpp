// generalized_eigh on CUDA: the shared algorithm (common/generalized_eigh.h) on the GPU, batched through ATen's
// linear algebra (cuSOLVER / MAGMA); the matrices never leave the device. A plain C++ file: no device code.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/generalized_eigh.h"

namespace gpp_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> generalized_eigh_cuda(const at::Tensor& a, const at::Tensor& b, double ridge) {
  TORCH_CHECK_VALUE(a.is_cuda() && b.is_cuda(), "generalized_eigh: a and b must be CUDA tensors, got ", a.device(),
                    " and ", b.device());
  const c10::DeviceGuard guard(a.device());
  return generalized_eigh_impl(a, b, ridge);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) { m.impl("generalized_eigh", &generalized_eigh_cuda); }

}  // namespace gpp_ext
