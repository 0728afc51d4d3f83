// discriminants on CUDA: the shared algorithm (common/discriminants.h) on the GPU through ATen's linear algebra
// (cuSOLVER / MAGMA); the statistics never leave the device. A plain C++ file: no device code.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/discriminants.h"

namespace gpp_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> discriminants_cuda(const at::Tensor& count, const at::Tensor& mean,
                                                                  const at::Tensor& within, double ridge,
                                                                  int64_t k) {
  TORCH_CHECK_VALUE(count.is_cuda() && mean.is_cuda() && within.is_cuda(),
                    "discriminants: count, mean and within must be CUDA tensors, got ", count.device(), ", ",
                    mean.device(), " and ", within.device());
  const c10::DeviceGuard guard(within.device());
  return discriminants_impl(count, mean, within, ridge, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) { m.impl("discriminants", &discriminants_cuda); }

}  // namespace gpp_ext
