// The Gram product of centred rows, shared by the CPU and CUDA class_scatter kernels (plain ATen calls, so
// the BLAS of the tensors' device does the work: MKL/OpenBLAS on the CPU, cuBLAS on a GPU).
#pragma once

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/triu.h>

#include <algorithm>
#include <cstdint>

namespace gpp_ext {

// Row bands of the Gram staircase: about 8 bands skip most of the lower triangle, and a band of at least 64
// rows keeps each GEMM efficient. A function of D only, so the arithmetic never depends on the thread count.
inline int64_t gram_band(int64_t d) { return std::max<int64_t>(64, ((d + 8 * 64 - 1) / (8 * 64)) * 64); }

// acc[i, j] += (rows^T rows)[i, j] for j >= i only. The Gram matrix is symmetric, so one GEMM per band of
// rows computes the upper staircase: (1 + 1/bands)/2 of the multiply-adds of rows^T rows (56% with 8 bands),
// which is what puts the kernel below one full float32 X^T X. `acc` is float64; `rows` float32 or float64.
inline void accumulate_upper_gram(const at::Tensor& rows, at::Tensor& acc) {
  // TF32 (allowed by torch.backends.cuda.matmul.allow_tf32 or set_float32_matmul_precision("high")) keeps 10
  // mantissa bits: a 1e-3 relative error in S_w. The statistics contract is float32 accuracy or better.
  at::NoTF32Guard no_tf32;
  const int64_t d = rows.size(1);
  const int64_t band_rows = gram_band(d);
  for (int64_t i0 = 0; i0 < d; i0 += band_rows) {
    const int64_t w = std::min(band_rows, d - i0);
    const at::Tensor band = rows.narrow(1, i0, w);       // [B, w], row stride d: BLAS reads it in place
    const at::Tensor rest = rows.narrow(1, i0, d - i0);  // [B, d - i0]
    acc.narrow(0, i0, w).narrow(1, i0, d - i0).add_(at::mm(band.t(), rest));
  }
}

// The full symmetric matrix from its upper triangle (the lower one was never accumulated): exactly symmetric.
inline at::Tensor mirror_upper(const at::Tensor& upper) { return at::triu(upper) + at::triu(upper, 1).t(); }

}  // namespace gpp_ext
