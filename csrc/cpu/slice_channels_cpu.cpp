// slice_channels on the CPU: a contiguous copy of t keeping the entries `index` along `dim` (index_select
// semantics: any order, repeats allowed). This is the copy behind every structural prune, so it moves whole
// inner slabs with memcpy, in parallel over (outer, kept) pairs, for any dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/arguments.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "slice_channels";

// Slabs at least this many bytes are moved with memcpy; smaller ones element by element.
constexpr int64_t kMemcpySlab = 64;

// out[o, j, e] = src[o, index[j], e] for slabs of `inner` elements of type word_t (the element's size).
template <typename word_t>
void gather_small(const char* src_bytes, char* dst_bytes, int64_t outer, int64_t size, int64_t inner,
                  const int64_t* index, int64_t k) {
  const auto* src = reinterpret_cast<const word_t*>(src_bytes);
  auto* dst = reinterpret_cast<word_t*>(dst_bytes);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * inner, 1));
  at::parallel_for(0, outer, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const word_t* s = src + o * size * inner;
      word_t* out = dst + o * k * inner;
      for (int64_t j = 0; j < k; ++j) {
        const word_t* from = s + index[j] * inner;
        for (int64_t e = 0; e < inner; ++e) out[j * inner + e] = from[e];
      }
    }
  });
}

at::Tensor slice_channels_cpu(const at::Tensor& t, int64_t dim_in, const at::Tensor& index_in) {
  const int64_t dim = check_slice_channels_args(t, dim_in, index_in);
  const int64_t size = t.size(dim);
  const at::Tensor index = index_in.contiguous();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const int64_t k = index.numel();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(ip[j] >= 0 && ip[j] < size, kOp, ": index must hold entries in [0, ", size,
                      ") for dim ", dim, " of t ", t.sizes(), ", got ", ip[j], " at position ", j);
  }
  std::vector<int64_t> out_sizes(t.sizes().begin(), t.sizes().end());
  out_sizes[dim] = k;
  at::Tensor out = at::empty(out_sizes, t.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  // Bytes are copied, so lazy conjugate/negative views must be materialised first.
  const at::Tensor src = t.resolve_conj().resolve_neg().contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= t.size(i);
  for (int64_t i = dim + 1; i < t.dim(); ++i) inner *= t.size(i);
  const int64_t slab = inner * static_cast<int64_t>(t.element_size());
  const auto* sp = static_cast<const char*>(src.const_data_ptr());
  auto* dp = static_cast<char*>(out.mutable_data_ptr());
  if (slab >= kMemcpySlab) {
    const int64_t grain = std::max<int64_t>(1, 65536 / slab);
    at::parallel_for(0, outer * k, grain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t o = q / k;
        const int64_t j = q % k;
        std::memcpy(dp + q * slab, sp + (o * size + ip[j]) * slab, static_cast<size_t>(slab));
      }
    });
    return out;
  }
  // Small slabs (slicing the last dims, e.g. a linear weight's inputs or a 1x1 conv): a memcpy call per few
  // bytes costs more than the copy, so gather whole words of the element size instead.
  switch (t.element_size()) {
    case 1: gather_small<uint8_t>(sp, dp, outer, size, inner, ip, k); break;
    case 2: gather_small<uint16_t>(sp, dp, outer, size, inner, ip, k); break;
    case 4: gather_small<uint32_t>(sp, dp, outer, size, inner, ip, k); break;
    case 8: gather_small<uint64_t>(sp, dp, outer, size, inner, ip, k); break;
    default:  // complex128 and wider: memcpy per slab
      for (int64_t q = 0; q < outer * k; ++q) {
        std::memcpy(dp + q * slab, sp + ((q / k) * size + ip[q % k]) * slab, static_cast<size_t>(slab));
      }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("slice_channels", &slice_channels_cpu); }

}  // namespace gpp_ext
