// slice_channels on the CPU: a contiguous copy of t keeping the entries `index` along `dim` (index_select
// semantics: any order, repeats allowed). This is the copy behind every structural prune, so it moves whole
// inner slabs with memcpy, in parallel over (outer, kept) pairs, for any dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"

namespace gpp_ext {
namespace {

constexpr const char* kOp = "slice_channels";

at::Tensor slice_channels_cpu(const at::Tensor& t, int64_t dim_in, const at::Tensor& index_in) {
  check_cpu(t, kOp, "t");
  check_cpu(index_in, kOp, "index");
  check_strided(t, kOp, "t");
  TORCH_CHECK_VALUE(t.dim() >= 1, kOp, ": t must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(dim_in >= -t.dim() && dim_in < t.dim(), kOp, ": dim must be in [", -t.dim(), ", ", t.dim(),
                    ") for a ", t.dim(), "-D tensor, got ", dim_in);
  check_long(index_in, kOp, "index");
  check_dim(index_in, 1, kOp, "index", "[K]");
  const int64_t dim = dim_in < 0 ? dim_in + t.dim() : dim_in;
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

  const at::Tensor src = t.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= t.size(i);
  for (int64_t i = dim + 1; i < t.dim(); ++i) inner *= t.size(i);
  const int64_t slab = inner * static_cast<int64_t>(t.element_size());
  const auto* sp = static_cast<const char*>(src.const_data_ptr());
  auto* dp = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(slab, 1));
  at::parallel_for(0, outer * k, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t o = q / k;
      const int64_t j = q % k;
      std::memcpy(dp + q * slab, sp + (o * size + ip[j]) * slab, static_cast<size_t>(slab));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpp_ext, CPU, m) { m.impl("slice_channels", &slice_channels_cpu); }

}  // namespace gpp_ext
