// merge_scatter on the CPU: Chan's exact merge of two partial scatter statistics,
//   count = na + nb,  mean_c = (na mu_a + nb mu_b) / n,
//   S_w = S_w^a + S_w^b + sum_c w_c (mu_a,c - mu_b,c)(mu_a,c - mu_b,c)^T,  w_c = na nb / n.
// The class sum is one GEMM, Delta^T diag(w) Delta. Exact in exact arithmetic and associative, which is what
// lets batches, layers and processes be accumulated in any order.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common/chan_merge.h"
#include "common/arguments.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "merge_scatter";

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_scatter_cpu(const at::Tensor& count_a, const at::Tensor& mean_a,
                                                                 const at::Tensor& within_a, const at::Tensor& count_b,
                                                                 const at::Tensor& mean_b,
                                                                 const at::Tensor& within_b) {
  const StatsShape shape = check_stats_args(count_a, mean_a, within_a, kOp, "_a", mean_a.device());
  check_stats_args(count_b, mean_b, within_b, kOp, "_b", mean_a.device(), shape);
  const int64_t num_classes = shape.num_classes;
  const int64_t d = shape.dim;

  const at::Tensor ca = count_a.contiguous(), cb = count_b.contiguous();
  const at::Tensor ma = mean_a.contiguous(), mb = mean_b.contiguous();
  at::Tensor count = ca + cb;
  at::Tensor mean = at::empty({num_classes, d}, ma.options());
  at::Tensor delta = at::empty({num_classes, d}, ma.options());
  at::Tensor weight = at::empty({num_classes}, ma.options());
  const double* cap = ca.const_data_ptr<double>();
  const double* cbp = cb.const_data_ptr<double>();
  const double* map = ma.const_data_ptr<double>();
  const double* mbp = mb.const_data_ptr<double>();
  double* mp = mean.mutable_data_ptr<double>();
  double* dp = delta.mutable_data_ptr<double>();
  double* wp = weight.mutable_data_ptr<double>();
  at::parallel_for(0, num_classes, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ChanWeights cw = chan_weights(cap[c], cbp[c]);
      wp[c] = cw.w;
      for (int64_t j = c * d; j < (c + 1) * d; ++j) {
        mp[j] = chan_mean(cw, map[j], mbp[j]);
        dp[j] = map[j] - mbp[j];
      }
    }
  });
  // within_a + within_b + Delta^T (w * Delta)
  at::Tensor within = at::addmm(within_a + within_b, delta.t(), delta * weight.unsqueeze(1));
  within = (within + within.t()).mul_(0.5);
  return {count, mean, within};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("merge_scatter", &merge_scatter_cpu); }

}  // namespace gpp_ext
