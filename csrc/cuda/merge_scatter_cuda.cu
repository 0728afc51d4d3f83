// merge_scatter on CUDA: Chan's exact merge (common/chan_merge.h), one thread per (class, feature); the
// mean-difference term Delta^T diag(w) Delta is one cuBLAS GEMM in float64. No atomics.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/chan_merge.h"
#include "common/arguments.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "merge_scatter";

__global__ void chan_merge_kernel(const double* __restrict__ ca, const double* __restrict__ ma,
                                  const double* __restrict__ cb, const double* __restrict__ mb, int64_t num_classes,
                                  int64_t d, double* __restrict__ mean, double* __restrict__ delta,
                                  double* __restrict__ weight) {
  const int64_t total = num_classes * d;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = q / d;
    const ChanWeights cw = chan_weights(ca[c], cb[c]);
    mean[q] = chan_mean(cw, ma[q], mb[q]);
    delta[q] = ma[q] - mb[q];
    if (q % d == 0) weight[c] = cw.w;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_scatter_cuda(const at::Tensor& count_a, const at::Tensor& mean_a,
                                                                  const at::Tensor& within_a,
                                                                  const at::Tensor& count_b, const at::Tensor& mean_b,
                                                                  const at::Tensor& within_b) {
  const StatsShape shape = check_stats_args(count_a, mean_a, within_a, kOp, "_a", mean_a.device());
  check_stats_args(count_b, mean_b, within_b, kOp, "_b", mean_a.device(), shape);
  const int64_t num_classes = shape.num_classes;
  const int64_t d = shape.dim;
  const c10::cuda::CUDAGuard guard(mean_a.device());
  const at::Tensor ca = count_a.contiguous(), cb = count_b.contiguous();
  const at::Tensor ma = mean_a.contiguous(), mb = mean_b.contiguous();
  at::Tensor mean = at::empty({num_classes, d}, ma.options());
  at::Tensor delta = at::empty({num_classes, d}, ma.options());
  at::Tensor weight = at::zeros({num_classes}, ma.options());
  const int64_t total = num_classes * d;
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 16);
    chan_merge_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        ca.const_data_ptr<double>(), ma.const_data_ptr<double>(), cb.const_data_ptr<double>(),
        mb.const_data_ptr<double>(), num_classes, d, mean.mutable_data_ptr<double>(), delta.mutable_data_ptr<double>(),
        weight.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor within = at::addmm(within_a + within_b, delta.t(), delta * weight.unsqueeze(1));
  within = (within + within.t()).mul_(0.5);
  return {ca + cb, mean, within};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) { m.impl("merge_scatter", &merge_scatter_cuda); }

}  // namespace gpp_ext
