// The argument contract of each op, checked identically by its CPU and CUDA kernels. The dispatcher picks a
// kernel from the tensors' devices, so "on the same device as the first tensor" is the only device rule a
// kernel needs; everything else is shapes, dtypes and values. Messages name the op and the argument
// (TypeError for a dtype, ValueError for a shape or value), as the Python wrappers do.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"

namespace gpp_ext {

inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const std::string& arg) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", arg, " must be on ", device, " with the other inputs, got ",
                    t.device());
  check_strided(t, op, arg.c_str());
}

// class_scatter(x [N, D] float32/float64, y [N] int64, num_classes >= 1).
inline void check_class_scatter_args(const at::Tensor& x, const at::Tensor& y, int64_t num_classes,
                                     const char* op = "class_scatter") {
  check_device(x, x.device(), op, "x");
  check_device(y, x.device(), op, "y");
  check_dim(x, 2, op, "x", "[N, D]");
  check_float_or_double(x, op, "x");
  check_dim(y, 1, op, "y", "[N]");
  check_long(y, op, "y");
  TORCH_CHECK_VALUE(y.size(0) == x.size(0), op, ": y must hold one label per row of x, got ", y.size(0),
                    " labels for ", x.size(0), " rows");
  TORCH_CHECK_VALUE(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
}

struct StatsShape {
  int64_t num_classes;
  int64_t dim;
};

// Scatter statistics count [C], mean [C, D], within [D, D], all float64 on `device`. `suffix` completes the
// argument names ("_a" gives count_a, ...); `expected`, when given, is the shape they must have.
inline StatsShape check_stats_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& within,
                                   const char* op, const std::string& suffix, const at::Device& device,
                                   std::optional<StatsShape> expected = std::nullopt) {
  const std::string c = "count" + suffix, m = "mean" + suffix, w = "within" + suffix;
  check_device(count, device, op, c);
  check_device(mean, device, op, m);
  check_device(within, device, op, w);
  check_double(count, op, c.c_str());
  check_double(mean, op, m.c_str());
  check_double(within, op, w.c_str());
  check_dim(count, 1, op, c.c_str(), "[C]");
  check_dim(mean, 2, op, m.c_str(), "[C, D]");
  check_dim(within, 2, op, w.c_str(), "[D, D]");
  const StatsShape shape{count.size(0), mean.size(1)};
  TORCH_CHECK_VALUE(mean.size(0) == shape.num_classes && within.size(0) == shape.dim && within.size(1) == shape.dim,
                    op, ": ", c, " [C], ", m, " [C, D] and ", w, " [D, D] must agree, got ", count.sizes(), ", ",
                    mean.sizes(), ", ", within.sizes());
  if (expected.has_value()) {
    TORCH_CHECK_VALUE(shape.num_classes == expected->num_classes && shape.dim == expected->dim, op,
                      ": the two statistics must have the same number of classes and the same dimension, got C = ",
                      expected->num_classes, ", D = ", expected->dim, " and ", c, " ", count.sizes(), ", ", m, " ",
                      mean.sizes());
  }
  return shape;
}

// class_scatter_backward(grad_mean [C, D], grad_within [D, D], x, y, count [C], mean [C, D]).
inline void check_class_scatter_backward_args(const at::Tensor& grad_mean, const at::Tensor& grad_within,
                                              const at::Tensor& x, const at::Tensor& y, const at::Tensor& count,
                                              const at::Tensor& mean) {
  constexpr const char* op = "class_scatter_backward";
  check_dim(count, 1, op, "count", "[C]");
  check_class_scatter_args(x, y, count.size(0), op);
  const int64_t num_classes = count.size(0);
  const int64_t d = x.size(1);
  check_device(grad_mean, x.device(), op, "grad_mean");
  check_device(grad_within, x.device(), op, "grad_within");
  check_device(count, x.device(), op, "count");
  check_device(mean, x.device(), op, "mean");
  TORCH_CHECK_VALUE(grad_mean.dim() == 2 && grad_mean.size(0) == num_classes && grad_mean.size(1) == d, op,
                    ": grad_mean must have shape [C, D] = [", num_classes, ", ", d, "], got ", grad_mean.sizes());
  TORCH_CHECK_VALUE(grad_within.dim() == 2 && grad_within.size(0) == d && grad_within.size(1) == d, op,
                    ": grad_within must have shape [D, D] = [", d, ", ", d, "], got ", grad_within.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 2 && mean.size(0) == num_classes && mean.size(1) == d, op,
                    ": mean must have shape [C, D] = [", num_classes, ", ", d, "], got ", mean.sizes());
}

// discriminant_utility(eigenvalues [..., D], eigenvectors [..., D, D], k in [0, D]); returns k.
inline int64_t check_discriminant_utility_args(const at::Tensor& eigenvalues, const at::Tensor& eigenvectors,
                                               std::optional<int64_t> k_opt) {
  constexpr const char* op = "discriminant_utility";
  check_device(eigenvalues, eigenvalues.device(), op, "eigenvalues");
  check_device(eigenvectors, eigenvalues.device(), op, "eigenvectors");
  check_float_or_double(eigenvalues, op, "eigenvalues");
  check_float_or_double(eigenvectors, op, "eigenvectors");
  TORCH_CHECK_VALUE(eigenvectors.dim() >= 2, op, ": eigenvectors must be [..., D, K] with eigenvectors as columns, got ",
                    eigenvectors.sizes());
  const auto vec_sizes = eigenvectors.sizes();
  std::vector<int64_t> value_sizes(vec_sizes.begin(), vec_sizes.end() - 2);
  value_sizes.push_back(eigenvectors.size(-1));
  TORCH_CHECK_VALUE(eigenvalues.sizes() == at::IntArrayRef(value_sizes), op,
                    ": eigenvalues must be [..., K] matching eigenvectors [..., D, K] = ", vec_sizes, ", got ",
                    eigenvalues.sizes());
  const int64_t cols = eigenvectors.size(-1);
  const int64_t k = k_opt.value_or(cols);
  TORCH_CHECK_VALUE(k >= 0 && k <= cols, op, ": k must be in [0, K] = [0, ", cols, "], got ", k);
  return k;
}

// fisher_utility(count, mean, within, eps >= 0).
inline StatsShape check_fisher_utility_args(const at::Tensor& count, const at::Tensor& mean,
                                            const at::Tensor& within, double eps) {
  constexpr const char* op = "fisher_utility";
  const StatsShape shape = check_stats_args(count, mean, within, op, "", mean.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  return shape;
}

// slice_channels(t [...], dim, index [K] int64); returns dim wrapped to [0, t.dim()). The index values are
// data: the CPU kernel checks them as it reads them, the CUDA kernel with a device assert.
inline int64_t check_slice_channels_args(const at::Tensor& t, int64_t dim, const at::Tensor& index) {
  constexpr const char* op = "slice_channels";
  check_device(t, t.device(), op, "t");
  check_device(index, t.device(), op, "index");
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": t must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(dim >= -t.dim() && dim < t.dim(), op, ": dim must be in [", -t.dim(), ", ", t.dim(),
                    ") for a ", t.dim(), "-D tensor, got ", dim);
  check_long(index, op, "index");
  check_dim(index, 1, op, "index", "[K]");
  return dim < 0 ? dim + t.dim() : dim;
}

}  // namespace gpp_ext
