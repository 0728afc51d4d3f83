// discriminants on the CPU (LAPACK through ATen); the algorithm is in common/discriminants.h.
#include <torch/library.h>

#include "common/checks.h"
#include "common/discriminants.h"

namespace gpp_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> discriminants_cpu(const at::Tensor& count, const at::Tensor& mean,
                                                                 const at::Tensor& within, double ridge, int64_t k) {
  check_cpu(count, "discriminants", "count");
  check_cpu(mean, "discriminants", "mean");
  check_cpu(within, "discriminants", "within");
  return discriminants_impl(count, mean, within, ridge, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("discriminants", &discriminants_cpu); }

}  // namespace gpp_ext
