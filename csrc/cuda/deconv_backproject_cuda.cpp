// deconv_backproject on CUDA: the shared op (common/deconv_backproject.h), i.e. cuDNN's transposed convolution
// (or a cuBLAS GEMM for a linear weight) on the current stream. A plain C++ file: no device code.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/deconv_backproject.h"

namespace gpp_ext {
namespace {

at::Tensor deconv_backproject_cuda(const at::Tensor& signal, const at::Tensor& weight, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   at::OptionalIntArrayRef output_size) {
  TORCH_CHECK_VALUE(signal.is_cuda() && weight.is_cuda(), "deconv_backproject: signal and weight must be CUDA "
                    "tensors, got ", signal.device(), " and ", weight.device());
  const c10::DeviceGuard guard(signal.device());
  return deconv_backproject_impl(signal, weight, stride, padding, dilation, groups, output_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) { m.impl("deconv_backproject", &deconv_backproject_cuda); }

}  // namespace gpp_ext
