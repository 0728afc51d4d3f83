// generalized_eigh on the CPU (LAPACK through ATen); the algorithm is in common/generalized_eigh.h.
#include <torch/library.h>

#include "common/checks.h"
#include "common/generalized_eigh.h"

namespace gpp_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> generalized_eigh_cpu(const at::Tensor& a, const at::Tensor& b, double ridge) {
  check_cpu(a, "generalized_eigh", "a");
  check_cpu(b, "generalized_eigh", "b");
  return generalized_eigh_impl(a, b, ridge);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("generalized_eigh", &generalized_eigh_cpu); }

}  // namespace gpp_ext
