// Neuron utilities at the pre-decision layer (docs/design.md §2.3), on the CPU.
//
// discriminant_utility: u_r = sum_{j<k} max(lambda_j, 0) |e_{r,j}| / ||e_j||, the eigenvalue-weighted absolute
//   loadings of the unit-normalised top-k discriminants (eigenvectors as columns, eigenvalues descending).
// fisher_utility: v_j = S_b[j,j] / (S_w[j,j] + eps * tr(S_t)/D), the per-neuron Fisher ratio, computed from
//   the class counts and means without forming S_b. The ridge is relative to the total scatter so the
//   utility is scale invariant; 0/0 (a neuron with no variance at all) is 0.
//
// Both accumulate in float64 and are parallel over output entries, each computed in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/arguments.h"

namespace gpp_ext {
namespace {

at::Tensor discriminant_utility_cpu(const at::Tensor& eigenvalues, const at::Tensor& eigenvectors,
                                    std::optional<int64_t> k_opt) {
  const int64_t k = check_discriminant_utility_args(eigenvalues, eigenvectors, k_opt);
  const int64_t d = eigenvectors.size(-2);
  const int64_t cols = eigenvectors.size(-1);
  const auto out_dtype = c10::promoteTypes(eigenvalues.scalar_type(), eigenvectors.scalar_type());
  const auto sizes = eigenvectors.sizes();
  at::Tensor out = at::zeros(sizes.slice(0, sizes.size() - 1), eigenvalues.options().dtype(at::kDouble));
  if (out.numel() == 0 || k == 0) return out.to(out_dtype);

  const at::Tensor lam = eigenvalues.to(at::kDouble).contiguous().view({-1, cols});
  const at::Tensor vec = eigenvectors.to(at::kDouble).contiguous().view({-1, d, cols});
  const int64_t batch = lam.size(0);
  const double* lp = lam.const_data_ptr<double>();
  const double* ep = vec.const_data_ptr<double>();
  double* up = out.mutable_data_ptr<double>();
  std::vector<double> weight(static_cast<size_t>(k));
  for (int64_t b = 0; b < batch; ++b) {
    const double* e = ep + b * d * cols;
    // Column norms of the top-k eigenvectors, each summed over rows in order.
    at::parallel_for(0, k, 64, [&](int64_t j0, int64_t j1) {
      std::vector<double> sq(static_cast<size_t>(j1 - j0), 0.0);
      for (int64_t r = 0; r < d; ++r) {
        for (int64_t j = j0; j < j1; ++j) sq[j - j0] += e[r * cols + j] * e[r * cols + j];
      }
      for (int64_t j = j0; j < j1; ++j) {
        const double norm = std::sqrt(sq[j - j0]);
        const double lambda = std::max(lp[b * cols + j], 0.0);  // negative values are round-off of zero
        weight[j] = norm > 0.0 ? lambda / norm : 0.0;
      }
    });
    at::parallel_for(0, d, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double acc = 0.0;
        const double* row = e + r * cols;
        for (int64_t j = 0; j < k; ++j) acc += weight[j] * std::abs(row[j]);
        up[b * d + r] = acc;
      }
    });
  }
  return out.to(out_dtype);
}

at::Tensor fisher_utility_cpu(const at::Tensor& count_in, const at::Tensor& mean_in, const at::Tensor& within_in,
                              double eps) {
  const auto [num_classes, d] = check_fisher_utility_args(count_in, mean_in, within_in, eps);
  at::Tensor out = at::zeros({d}, mean_in.options());
  if (d == 0) return out;
  const at::Tensor count = count_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const double* cp = count.const_data_ptr<double>();
  const double* mp = mean.const_data_ptr<double>();
  double total = 0.0;
  for (int64_t c = 0; c < num_classes; ++c) total += cp[c];
  if (total <= 0.0) return out;

  // Per-neuron between-class scatter S_b[j,j] = sum_c n_c (mu_cj - mu_j)^2 and the within diagonal. Classes
  // in the outer loop so the inner loop runs along contiguous rows of `mean` (and vectorises).
  std::vector<double> mu(static_cast<size_t>(d), 0.0), between(static_cast<size_t>(d), 0.0),
      within_diag(static_cast<size_t>(d));
  const auto w_acc = within_in.accessor<double, 2>();
  at::parallel_for(0, d, 2048, [&](int64_t j0, int64_t j1) {
    for (int64_t c = 0; c < num_classes; ++c) {
      const double* m = mp + c * d;
      for (int64_t j = j0; j < j1; ++j) mu[j] += cp[c] * m[j];
    }
    for (int64_t j = j0; j < j1; ++j) mu[j] /= total;
    for (int64_t c = 0; c < num_classes; ++c) {
      const double* m = mp + c * d;
      for (int64_t j = j0; j < j1; ++j) {
        const double diff = m[j] - mu[j];
        between[j] += cp[c] * diff * diff;
      }
    }
    for (int64_t j = j0; j < j1; ++j) within_diag[j] = w_acc[j][j];
  });
  double trace = 0.0;
  for (int64_t j = 0; j < d; ++j) trace += between[j] + within_diag[j];
  const double ridge = eps * trace / static_cast<double>(d);
  double* op_ = out.mutable_data_ptr<double>();
  for (int64_t j = 0; j < d; ++j) {
    const double denom = within_diag[j] + ridge;
    if (denom > 0.0) {
      op_[j] = between[j] / denom;
    } else {  // only with eps == 0: a neuron that separates classes with no within-class spread
      op_[j] = between[j] > 0.0 ? std::numeric_limits<double>::infinity() : 0.0;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) {
  m.impl("discriminant_utility", &discriminant_utility_cpu);
  m.impl("fisher_utility", &fisher_utility_cpu);
}

}  // namespace gpp_ext
