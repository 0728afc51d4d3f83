// class_scatter on CUDA: per-class counts, float64 class means and the within-class scatter, plus the backward.
//
// Same numerics as the CPU kernel (csrc/cpu/class_scatter_cpu.cpp): rows are centred by their float64 class
// mean before the Gram product, which runs through cuBLAS on blocks of rows (TF32 disabled) and is accumulated
// in float64, upper triangle only (common/gram.h).
//
// No atomics and no host synchronisation. The labels are sorted (stable radix sort, deterministic), so each
// class's rows form one segment; class offsets come from a binary search of the sorted labels; one block per
// (class, 32-column tile) sums its segment in a fixed order with a fixed shared-memory reduction. Results are
// therefore bitwise reproducible and the kernels are valid under torch.use_deterministic_algorithms(True).
// Labels outside [0, C) fall outside every segment and are ignored by the kernels; gpp_ext.ops raises for them
// before they get here unless its data checks are switched off (each check costs a host sync on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/arguments.h"
#include "common/gram.h"

namespace gpp_ext {
namespace {

constexpr int kColTile = 32;   // columns per block: one warp reads 32 consecutive features of a row
constexpr int kRowLanes = 8;   // rows summed in parallel per block, then reduced in a fixed order
constexpr int64_t kRowBlock = 16384;  // rows centred and multiplied per GEMM
constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 16); }

// mean[c, j] = (sum over the rows of class c, in sorted order) / n_c, in float64.
template <typename scalar_t>
__global__ void class_means_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ offsets, int64_t num_classes, int64_t d,
                                   double* __restrict__ mean) {
  __shared__ double part[kRowLanes][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  for (int64_t c = blockIdx.y; c < num_classes; c += gridDim.y) {
    const int64_t begin = offsets[c];
    const int64_t end = offsets[c + 1];
    double acc = 0.0;
    if (j < d) {
      for (int64_t r = begin + threadIdx.y; r < end; r += kRowLanes) acc += static_cast<double>(x[order[r] * d + j]);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < d) {
      double sum = 0.0;
      for (int lane = 0; lane < kRowLanes; ++lane) sum += part[lane][threadIdx.x];
      const int64_t n = end - begin;
      mean[c * d + j] = n > 0 ? sum / static_cast<double>(n) : 0.0;
    }
    __syncthreads();
  }
}

// out[i - r0, j] = x[i, j] - mean[y[i], j] (0 for a label outside [0, C)), rounded to out_t.
template <typename scalar_t, typename out_t>
__global__ void centre_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ y,
                                   const double* __restrict__ mean, int64_t r0, int64_t rows, int64_t d,
                                   int64_t num_classes, out_t* __restrict__ out) {
  const int64_t total = rows * d;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = r0 + q / d;
    const int64_t j = q % d;
    const int64_t label = y[i];
    out[q] = (label >= 0 && label < num_classes)
                 ? static_cast<out_t>(static_cast<double>(x[i * d + j]) - mean[label * d + j])
                 : out_t(0);
  }
}

// grad[i - r0, j] += grad_mean[y[i], j] / n_{y[i]}.
template <typename scalar_t>
__global__ void add_mean_grad_kernel(scalar_t* __restrict__ grad, const int64_t* __restrict__ y,
                                     const double* __restrict__ grad_mean, const double* __restrict__ count,
                                     int64_t r0, int64_t rows, int64_t d, int64_t num_classes) {
  const int64_t total = rows * d;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t label = y[r0 + q / d];
    if (label < 0 || label >= num_classes || count[label] <= 0.0) continue;
    grad[q] = static_cast<scalar_t>(static_cast<double>(grad[q]) + grad_mean[label * d + q % d] / count[label]);
  }
}

// Class segments of the label-sorted rows: (order, offsets [C + 1]); all on the device.
std::tuple<at::Tensor, at::Tensor> class_segments(const at::Tensor& y, int64_t num_classes) {
  auto [sorted, order] = at::sort(y, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(num_classes + 1, y.options());
  return {order, at::searchsorted(sorted, bounds)};
}

at::Tensor class_means(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, int64_t num_classes) {
  const int64_t d = x.size(1);
  at::Tensor mean = at::zeros({num_classes, d}, x.options().dtype(at::kDouble));
  if (d == 0) return mean;
  const dim3 block(kColTile, kRowLanes);
  const dim3 grid(static_cast<unsigned>((d + kColTile - 1) / kColTile),
                  static_cast<unsigned>(std::min<int64_t>(num_classes, 65535)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "class_means_cuda", [&] {
    class_means_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        num_classes, d, mean.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mean;
}

template <typename scalar_t>
void centre_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mean, int64_t r0, int64_t rows,
                 at::Tensor& out) {
  const int64_t d = x.size(1);
  centre_rows_kernel<scalar_t, scalar_t><<<blocks_for(rows * d), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), mean.const_data_ptr<double>(), r0, rows, d,
      mean.size(0), out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_scatter_cuda(const at::Tensor& x_, const at::Tensor& y_,
                                                                  int64_t num_classes) {
  check_class_scatter_args(x_, y_, num_classes);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t n = x_.size(0);
  const int64_t d = x_.size(1);
  const auto options = x_.options().dtype(at::kDouble);
  at::Tensor within = at::zeros({d, d}, options);
  if (n == 0) {
    return {at::zeros({num_classes}, options), at::zeros({num_classes, d}, options), within};
  }
  const at::Tensor x = x_.contiguous();
  const at::Tensor y = y_.contiguous();
  auto [order, offsets] = class_segments(y, num_classes);
  const at::Tensor count = (offsets.narrow(0, 1, num_classes) - offsets.narrow(0, 0, num_classes)).to(at::kDouble);
  const at::Tensor mean = class_means(x, order, offsets, num_classes);
  if (d == 0) return {count, mean, within};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "class_scatter_cuda", [&] {
    at::Tensor block = at::empty({std::min(n, kRowBlock), d}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t rows = std::min(n, r0 + kRowBlock) - r0;
      centre_rows<scalar_t>(x, y, mean, r0, rows, block);
      accumulate_upper_gram(block.narrow(0, 0, rows), within);
    }
  });
  return {count, mean, mirror_upper(within)};
}

// d/dx_i = grad_mean[y_i] / n_{y_i} + (G + G^T)(x_i - mu_{y_i}); see the CPU kernel for the derivation.
at::Tensor class_scatter_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_within,
                                       const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& count,
                                       const at::Tensor& mean) {
  check_class_scatter_backward_args(grad_mean, grad_within, x_, y_, count, mean);
  const int64_t num_classes = count.size(0);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t n = x_.size(0);
  const int64_t d = x_.size(1);
  at::Tensor grad_x = at::empty({n, d}, x_.options());
  if (n == 0 || d == 0) return grad_x;
  const at::Tensor x = x_.contiguous();
  const at::Tensor y = y_.contiguous();
  const at::Tensor mean64 = mean.to(at::kDouble).contiguous();
  const at::Tensor count64 = count.to(at::kDouble).contiguous();
  const at::Tensor gm = grad_mean.to(at::kDouble).contiguous();
  const at::Tensor gw_sym = (grad_within + grad_within.t()).to(x.scalar_type()).contiguous();
  const at::NoTF32Guard no_tf32;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "class_scatter_backward_cuda", [&] {
    at::Tensor block = at::empty({std::min(n, kRowBlock), d}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t rows = std::min(n, r0 + kRowBlock) - r0;
      centre_rows<scalar_t>(x, y, mean64, r0, rows, block);
      at::Tensor out = grad_x.narrow(0, r0, rows);
      at::mm_out(out, block.narrow(0, 0, rows), gw_sym);
      add_mean_grad_kernel<scalar_t><<<blocks_for(rows * d), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          out.mutable_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), gm.const_data_ptr<double>(),
          count64.const_data_ptr<double>(), r0, rows, d, num_classes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) {
  m.impl("class_scatter", &class_scatter_cuda);
  m.impl("class_scatter_backward", &class_scatter_backward_cuda);
}

}  // namespace gpp_ext
