// deconv_backproject on the CPU; the op is in common/deconv_backproject.h.
#include <torch/library.h>

#include "common/checks.h"
#include "common/deconv_backproject.h"

namespace gpp_ext {
namespace {

at::Tensor deconv_backproject_cpu(const at::Tensor& signal, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  at::OptionalIntArrayRef output_size) {
  check_cpu(signal, "deconv_backproject", "signal");
  check_cpu(weight, "deconv_backproject", "weight");
  return deconv_backproject_impl(signal, weight, stride, padding, dilation, groups, output_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("deconv_backproject", &deconv_backproject_cpu); }

}  // namespace gpp_ext
