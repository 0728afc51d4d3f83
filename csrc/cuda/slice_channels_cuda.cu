// slice_channels on CUDA: one thread per output element, copying whole words of the element's size, any dtype.
// An index outside [0, size) trips a device-side assert (as index_select does); gpp_ext.ops checks the range
// first unless its data checks are switched off.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/arguments.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "slice_channels";

struct alignas(16) Word16 {
  uint64_t lo, hi;
};

template <typename word_t>
__global__ void gather_kernel(const word_t* __restrict__ src, word_t* __restrict__ dst,
                              const int64_t* __restrict__ index, int64_t size, int64_t k, int64_t inner,
                              int64_t total) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = q % inner;
    const int64_t j = (q / inner) % k;
    const int64_t o = q / (inner * k);
    const int64_t i = index[j];
    CUDA_KERNEL_ASSERT(i >= 0 && i < size);
    dst[q] = src[(o * size + i) * inner + e];
  }
}

template <typename word_t>
void launch(const at::Tensor& src, at::Tensor& out, const at::Tensor& index, int64_t size, int64_t k, int64_t inner) {
  const int64_t total = out.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 16);
  gather_kernel<word_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const word_t*>(src.const_data_ptr()), static_cast<word_t*>(out.mutable_data_ptr()),
      index.const_data_ptr<int64_t>(), size, k, inner, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor slice_channels_cuda(const at::Tensor& t, int64_t dim_in, const at::Tensor& index_in) {
  const int64_t dim = check_slice_channels_args(t, dim_in, index_in);
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t k = index_in.numel();
  std::vector<int64_t> out_sizes(t.sizes().begin(), t.sizes().end());
  out_sizes[dim] = k;
  at::Tensor out = at::empty(out_sizes, t.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Bytes are copied, so lazy conjugate/negative views must be materialised first.
  const at::Tensor src = t.resolve_conj().resolve_neg().contiguous();
  const at::Tensor index = index_in.contiguous();
  int64_t inner = 1;
  for (int64_t i = dim + 1; i < t.dim(); ++i) inner *= t.size(i);
  switch (t.element_size()) {
    case 1: launch<uint8_t>(src, out, index, t.size(dim), k, inner); break;
    case 2: launch<uint16_t>(src, out, index, t.size(dim), k, inner); break;
    case 4: launch<uint32_t>(src, out, index, t.size(dim), k, inner); break;
    case 8: launch<uint64_t>(src, out, index, t.size(dim), k, inner); break;
    case 16: launch<Word16>(src, out, index, t.size(dim), k, inner); break;
    default: TORCH_CHECK_TYPE(false, kOp, ": unsupported element size ", t.element_size(), " of dtype ", t.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CUDA, m) { m.impl("slice_channels", &slice_channels_cuda); }

}  // namespace gpp_ext
