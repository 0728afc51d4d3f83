// Neuron utilities on CUDA (definitions in csrc/cpu/utility_cpu.cpp). Every sum is a fixed-order loop or a
// fixed shared-memory tree, so results are reproducible; no atomics, no host synchronisation.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common/arguments.h"

namespace gpp_ext {
namespace {

constexpr int kThreads = 256;

// Sums v over the block with a fixed tree; every thread gets the result.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// weight[b, j] = max(lambda_j, 0) / ||e_j|| for j < k: one block per (column, batch entry). Eigenvectors are
// [batch, d, cols] (cols >= k columns), eigenvalues [batch, cols].
__global__ void discriminant_weight_kernel(const double* __restrict__ values, const double* __restrict__ vectors,
                                           int64_t d, int64_t cols, int64_t k, double* __restrict__ weight) {
  __shared__ double shared[kThreads];
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const double* e = vectors + b * d * cols;
  double sq = 0.0;
  for (int64_t r = threadIdx.x; r < d; r += blockDim.x) sq += e[r * cols + j] * e[r * cols + j];
  const double norm = sqrt(block_sum(sq, shared));
  if (threadIdx.x == 0) {
    const double v = values[b * cols + j];
    const double lambda = isnan(v) ? v : fmax(v, 0.0);  // negative values are round-off of zero; NaN stays NaN
    weight[b * k + j] = norm > 0.0 ? lambda / norm : 0.0;
  }
}

// u[b, r] = sum_{j<k} weight[b, j] |e_{r,j}|: one block per (row, batch entry), threads along the row.
__global__ void discriminant_sum_kernel(const double* __restrict__ vectors, const double* __restrict__ weight,
                                        int64_t d, int64_t cols, int64_t k, double* __restrict__ out) {
  __shared__ double shared[kThreads];
  const int64_t r = blockIdx.x;
  const int64_t b = blockIdx.y;
  const double* row = vectors + b * d * cols + r * cols;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) acc += weight[b * k + j] * fabs(row[j]);
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) out[b * d + r] = total;
}

at::Tensor discriminant_utility_cuda(const at::Tensor& eigenvalues, const at::Tensor& eigenvectors,
                                     std::optional<int64_t> k_opt) {
  const int64_t k = check_discriminant_utility_args(eigenvalues, eigenvectors, k_opt);
  const int64_t d = eigenvectors.size(-2);
  const int64_t cols = eigenvectors.size(-1);
  const c10::cuda::CUDAGuard guard(eigenvectors.device());
  const auto out_dtype = c10::promoteTypes(eigenvalues.scalar_type(), eigenvectors.scalar_type());
  const auto sizes = eigenvectors.sizes();
  at::Tensor out = at::zeros(sizes.slice(0, sizes.size() - 1), eigenvalues.options().dtype(at::kDouble));
  if (out.numel() == 0 || k == 0) return out.to(out_dtype);
  const at::Tensor lam = eigenvalues.to(at::kDouble).contiguous().view({-1, cols});
  const at::Tensor vec = eigenvectors.to(at::kDouble).contiguous().view({-1, d, cols});
  const int64_t batch = lam.size(0);
  at::Tensor weight = at::empty({batch, k}, lam.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // the batch goes on grid.y, at most 65535 per launch: larger batches in slices of that many
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridY) {
    const int64_t n = std::min(kMaxGridY, batch - b0);
    const double* lam_b = lam.const_data_ptr<double>() + b0 * cols;
    const double* vec_b = vec.const_data_ptr<double>() + b0 * d * cols;
    double* weight_b = weight.mutable_data_ptr<double>() + b0 * k;
    discriminant_weight_kernel<<<dim3(static_cast<unsigned>(k), static_cast<unsigned>(n)), kThreads, 0, stream>>>(
        lam_b, vec_b, d, cols, k, weight_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    discriminant_sum_kernel<<<dim3(static_cast<unsigned>(d), static_cast<unsigned>(n)), kThreads, 0, stream>>>(
        vec_b, weight_b, d, cols, k, out.mutable_data_ptr<double>() + b0 * d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(out_dtype);
}

// between[j] = sum_c n_c (mu_cj - mu_j)^2 and diag[j] = S_w[j, j]: one thread per feature, classes in order.
__global__ void fisher_terms_kernel(const double* __restrict__ count, const double* __restrict__ mean,
                                    const double* __restrict__ within, int64_t num_classes, int64_t d,
                                    double* __restrict__ between, double* __restrict__ diag) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0.0, mu = 0.0;
    for (int64_t c = 0; c < num_classes; ++c) {
      total += count[c];
      mu += count[c] * mean[c * d + j];
    }
    double sb = 0.0;
    if (total > 0.0) {
      mu /= total;
      for (int64_t c = 0; c < num_classes; ++c) {
        const double diff = mean[c * d + j] - mu;
        sb += count[c] * diff * diff;
      }
    }
    between[j] = sb;
    diag[j] = total > 0.0 ? within[j * d + j] : 0.0;
  }
}

at::Tensor fisher_utility_cuda(const at::Tensor& count_in, const at::Tensor& mean_in, const at::Tensor& within_in,
                               double eps) {
  const auto [num_classes, d] = check_fisher_utility_args(count_in, mean_in, within_in, eps);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  if (d == 0) return at::zeros({0}, mean_in.options());
  const at::Tensor count = count_in.contiguous(), mean = mean_in.contiguous(), within = within_in.contiguous();
  at::Tensor between = at::empty({d}, mean.options());
  at::Tensor diag = at::empty({d}, mean.options());
  const int64_t blocks = std::min<int64_t>((d + kThreads - 1) / kThreads, 65535);
  fisher_terms_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      count.const_data_ptr<double>(), mean.const_data_ptr<double>(), within.const_data_ptr<double>(), num_classes, d,
      between.mutable_data_ptr<double>(), diag.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The ridge eps * tr(S_t) / D stays a device scalar: no read-back.
  const at::Tensor denom = diag + (between.sum() + diag.sum()) * (eps / static_cast<double>(d));
  const at::Tensor inf_or_zero = at::where(between.gt(0), at::full_like(between, std::numeric_limits<double>::infinity()),
                                           at::zeros_like(between));
  return at::where(denom.gt(0), between / denom.clamp_min(1e-300), inf_or_zero);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) {
  m.impl("discriminant_utility", &discriminant_utility_cuda);
  m.impl("fisher_utility", &fisher_utility_cuda);
}

}  // namespace gpp_ext
