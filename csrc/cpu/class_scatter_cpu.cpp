// class_scatter on the CPU: per-class counts, float64 class means and the unnormalised within-class scatter
// S_w = sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T, plus its backward.
//
// Numerics. Rows are centred by their float64 class mean *before* the Gram product, never
// X^T X - n mu mu^T, which cancels catastrophically for features with large means (post-ReLU, or raw pixel
// intensities). The centred rows are rounded back to the input dtype, so a float32 input keeps float32 GEMM
// speed while its rounding error is relative to the centred value, not to the mean. The Gram product runs
// over blocks of kRowBlock rows and each block's result is accumulated into float64, so float32 rounding
// never spans more than kRowBlock terms. Only the upper triangle is multiplied; it is mirrored at the end,
// so S_w is exactly symmetric.
//
// Determinism. Block boundaries are fixed constants; class sums are parallel over columns (each (class,
// column) sum is a fixed sequential order over rows); centring is parallel over rows (independent); so the
// result is bitwise identical for any thread count, given a deterministic GEMM. (MKL's is not on Intel CPUs:
// its summation order follows its thread count unless MKL_CBWR=COMPATIBLE is set; S_w then moves in its last
// bits, ~1e-9 relative, with torch.set_num_threads.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "common/arguments.h"
#include "common/gram.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "class_scatter";
constexpr int64_t kRowBlock = 4096;

// Element budget per parallel chunk: below this, threading costs more than it saves.
constexpr int64_t kGrainElements = 32768;

void count_labels(const int64_t* y, int64_t n, int64_t num_classes, double* count) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = y[i];
    TORCH_CHECK_VALUE(label >= 0 && label < num_classes, kOp, ": y must hold labels in [0, num_classes) = [0, ",
                      num_classes, "), got ", label, " at index ", i);
    count[label] += 1.0;
  }
}

// mean[c, :] = (sum of rows of class c) / count[c], accumulated in float64. Parallel over column chunks.
template <typename scalar_t>
void class_means(const scalar_t* x, const int64_t* y, int64_t n, int64_t d, int64_t num_classes,
                 const double* count, double* mean) {
  const int64_t grain = std::max<int64_t>(16, kGrainElements / std::max<int64_t>(n, 1));
  at::parallel_for(0, d, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = x + i * d;
      double* sum = mean + y[i] * d;
      for (int64_t j = j0; j < j1; ++j) sum[j] += static_cast<double>(row[j]);
    }
    for (int64_t c = 0; c < num_classes; ++c) {
      if (count[c] <= 0.0) continue;
      double* m = mean + c * d;
      for (int64_t j = j0; j < j1; ++j) m[j] /= count[c];
    }
  });
}

// out[i - r0, :] = x[i, :] - mean[y[i], :] for rows r0 <= i < r1, rounded to scalar_t.
template <typename scalar_t>
void centre_rows(const scalar_t* x, const int64_t* y, const double* mean, int64_t r0, int64_t r1, int64_t d,
                 scalar_t* out) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const scalar_t* row = x + i * d;
      const double* m = mean + y[i] * d;
      scalar_t* o = out + (i - r0) * d;
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(static_cast<double>(row[j]) - m[j]);
    }
  });
}

void check_features_finite(const double* mean, int64_t num_classes, int64_t d) {
  // NaN or Inf anywhere in x reaches its class sum, so one O(C*D) scan replaces an O(N*D) one.
  for (int64_t c = 0; c < num_classes; ++c) {
    for (int64_t j = 0; j < d; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(mean[c * d + j]), kOp,
                        ": x must be finite, found NaN or Inf in feature ", j, " of a sample of class ", c);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_scatter_cpu(const at::Tensor& x_, const at::Tensor& y_,
                                                                 int64_t num_classes) {
  check_class_scatter_args(x_, y_, num_classes);
  const int64_t n = x_.size(0);
  const int64_t d = x_.size(1);
  const auto options = x_.options().dtype(at::kDouble);
  at::Tensor count = at::zeros({num_classes}, options);
  at::Tensor mean = at::zeros({num_classes, d}, options);
  at::Tensor within = at::zeros({d, d}, options);
  if (n == 0) return {count, mean, within};

  const at::Tensor y = y_.contiguous();
  count_labels(y.const_data_ptr<int64_t>(), n, num_classes, count.mutable_data_ptr<double>());
  if (d == 0) return {count, mean, within};

  const at::Tensor x = x_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "class_scatter_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    double* mp = mean.mutable_data_ptr<double>();
    class_means<scalar_t>(xp, yp, n, d, num_classes, count.const_data_ptr<double>(), mp);
    check_features_finite(mp, num_classes, d);

    at::Tensor block = at::empty({std::min(n, kRowBlock), d}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t r1 = std::min(n, r0 + kRowBlock);
      centre_rows<scalar_t>(xp, yp, mp, r0, r1, d, block.mutable_data_ptr<scalar_t>());
      accumulate_upper_gram(block.narrow(0, 0, r1 - r0), within);
    }
  });
  within = mirror_upper(within);
  // Centred float32 rows cannot overflow unless |x - mean| > ~1e19; say so rather than return Inf.
  TORCH_CHECK_VALUE(x.scalar_type() == at::kDouble || at::isfinite(within).all().item<bool>(), kOp,
                    ": the within-class scatter overflowed float32; pass x as float64");
  return {count, mean, within};
}

// d/dx_i of <G_m, mean> + <G_w, S_w> = G_m[y_i] / n_{y_i} + (G_w + G_w^T)(x_i - mu_{y_i}).
// The dependence of S_w on the means vanishes because centred rows sum to zero within each class.
at::Tensor class_scatter_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_within,
                                      const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& count,
                                      const at::Tensor& mean) {
  constexpr const char* op = "class_scatter_backward";
  check_class_scatter_backward_args(grad_mean, grad_within, x_, y_, count, mean);
  const int64_t n = x_.size(0);
  const int64_t d = x_.size(1);
  const int64_t num_classes = count.size(0);
  at::Tensor grad_x = at::empty({n, d}, x_.options());
  if (n == 0 || d == 0) return grad_x;

  const at::Tensor x = x_.contiguous();
  const at::Tensor y = y_.contiguous();
  const at::Tensor mean64 = mean.to(at::kDouble).contiguous();
  const at::Tensor count64 = count.to(at::kDouble).contiguous();
  const at::Tensor gm = grad_mean.to(at::kDouble).contiguous();
  const at::Tensor gw_sym = (grad_within + grad_within.t()).to(x.scalar_type()).contiguous();

  const int64_t* yp = y.const_data_ptr<int64_t>();
  const double* cp = count64.const_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {  // before any read through a label
    TORCH_CHECK_VALUE(yp[i] >= 0 && yp[i] < num_classes && cp[yp[i]] > 0.0, op,
                      ": y must hold labels of non-empty classes in [0, num_classes), got ", yp[i], " at index ", i);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "class_scatter_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const double* mp = mean64.const_data_ptr<double>();
    const double* gmp = gm.const_data_ptr<double>();
    at::Tensor block = at::empty({std::min(n, kRowBlock), d}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t r1 = std::min(n, r0 + kRowBlock);
      centre_rows<scalar_t>(xp, yp, mp, r0, r1, d, block.mutable_data_ptr<scalar_t>());
      at::Tensor out = grad_x.narrow(0, r0, r1 - r0);
      at::mm_out(out, block.narrow(0, 0, r1 - r0), gw_sym);
      scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, kGrainElements / d);
      at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          const int64_t c = yp[i];
          const double inv = 1.0 / cp[c];
          const double* g = gmp + c * d;
          scalar_t* o = op_ + (i - r0) * d;
          for (int64_t j = 0; j < d; ++j) o[j] = static_cast<scalar_t>(static_cast<double>(o[j]) + g[j] * inv);
        }
      });
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) {
  m.impl("class_scatter", &class_scatter_cpu);
  m.impl("class_scatter_backward", &class_scatter_backward_cpu);
}

}  // namespace gpp_ext
