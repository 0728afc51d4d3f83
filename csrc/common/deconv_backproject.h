// deconv_backproject, shared by the CPU and CUDA registrations: carries a signal at a layer's output back to
// its input through the layer's own weights (the Zeiler-Fergus "deconvolution", docs/design.md §2.4). For a
// convolution that is the transposed convolution with the same stride, padding, dilation and groups, i.e. the
// adjoint of the forward map; a linear weight [out, in] is a 1x1 convolution, so its back-projection is
// signal @ weight.
//
// A strided convolution maps several input sizes to one output size; output_size (the spatial size of the
// layer's input) picks the right one, as output_padding = output_size - minimal transposed size.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <vector>

#include "common/checks.h"

namespace gpp_ext {
namespace deconv_detail {

constexpr const char* kOp = "deconv_backproject";

inline std::vector<int64_t> expand_param(at::IntArrayRef values, int64_t spatial, const char* name) {
  TORCH_CHECK_VALUE(values.size() == 1 || static_cast<int64_t>(values.size()) == spatial, kOp, ": ", name,
                    " must have 1 or ", spatial, " entries for a ", spatial, "-D convolution, got ", values);
  std::vector<int64_t> out(static_cast<size_t>(spatial));
  for (int64_t i = 0; i < spatial; ++i) out[i] = values.size() == 1 ? values[0] : values[i];
  return out;
}

}  // namespace deconv_detail

// The whole op on any device: the transposed convolution is ATen's (oneDNN on the CPU, cuDNN on a GPU).
inline at::Tensor deconv_backproject_impl(const at::Tensor& signal, const at::Tensor& weight,
                                          at::IntArrayRef stride_in, at::IntArrayRef padding_in,
                                          at::IntArrayRef dilation_in, int64_t groups,
                                          at::OptionalIntArrayRef output_size) {
  using namespace deconv_detail;
  TORCH_CHECK_VALUE(signal.device() == weight.device(), kOp, ": signal and weight must be on the same device, got ",
                    signal.device(), " and ", weight.device());
  check_strided(signal, kOp, "signal");
  check_strided(weight, kOp, "weight");
  check_float_or_double(signal, kOp, "signal");
  check_float_or_double(weight, kOp, "weight");
  TORCH_CHECK_TYPE(signal.scalar_type() == weight.scalar_type(), kOp, ": signal and weight must share a dtype, got ",
                   signal.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() >= 2 && weight.dim() <= 5, kOp,
                    ": weight must be a linear weight [out, in] or a convolution weight [C_out, C_in/groups, k...], "
                    "got shape ", weight.sizes());
  TORCH_CHECK_VALUE(groups >= 1, kOp, ": groups must be >= 1, got ", groups);

  if (weight.dim() == 2) {
    TORCH_CHECK_VALUE(groups == 1, kOp, ": groups must be 1 for a linear weight, got ", groups);
    TORCH_CHECK_VALUE(signal.dim() == 2 && signal.size(1) == weight.size(0), kOp,
                      ": signal must be [B, out_features] = [B, ", weight.size(0), "] for a linear weight ",
                      weight.sizes(), ", got ", signal.sizes());
    return at::mm(signal, weight);
  }

  const int64_t spatial = weight.dim() - 2;
  TORCH_CHECK_VALUE(signal.dim() == weight.dim() && signal.size(1) == weight.size(0), kOp, ": signal must be [B, ",
                    weight.size(0), ", spatial...] with ", spatial, " spatial dims for weight ", weight.sizes(),
                    ", got ", signal.sizes());
  TORCH_CHECK_VALUE(weight.size(0) % groups == 0, kOp, ": groups (", groups,
                    ") must divide the output channels of weight (", weight.size(0), ")");
  const auto stride = expand_param(stride_in, spatial, "stride");
  const auto padding = expand_param(padding_in, spatial, "padding");
  const auto dilation = expand_param(dilation_in, spatial, "dilation");
  std::vector<int64_t> output_padding(static_cast<size_t>(spatial), 0);
  for (int64_t i = 0; i < spatial; ++i) {
    TORCH_CHECK_VALUE(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, kOp,
                      ": stride and dilation must be >= 1 and padding >= 0, got stride ", stride_in, ", padding ",
                      padding_in, ", dilation ", dilation_in);
    const int64_t minimal = (signal.size(2 + i) - 1) * stride[i] - 2 * padding[i] +
                            dilation[i] * (weight.size(2 + i) - 1) + 1;
    if (output_size.has_value()) {
      const auto size = *output_size;
      TORCH_CHECK_VALUE(static_cast<int64_t>(size.size()) == spatial, kOp, ": output_size must list the ", spatial,
                        " spatial sizes of the layer input, got ", size);
      const int64_t extra = size[i] - minimal;
      TORCH_CHECK_VALUE(extra >= 0 && extra < std::max(stride[i], dilation[i]), kOp, ": output_size ", size,
                        " is not an input size that this convolution maps to the signal's spatial size ",
                        signal.sizes().slice(2));
      output_padding[i] = extra;
    } else {
      TORCH_CHECK_VALUE(minimal >= 1, kOp, ": the transposed convolution would have an empty output for signal ",
                        signal.sizes(), "; check stride and padding");
    }
  }
  return at::convolution(signal, weight, /*bias=*/std::nullopt, stride, padding, dilation, /*transposed=*/true,
                         output_padding, groups);
}

}  // namespace gpp_ext
