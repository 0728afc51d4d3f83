// generalized_eigh, shared by the CPU and CUDA registrations: a e = lambda b' e with
// b' = b + ridge * tr(b)/D * I, batched over leading dims.
//
// Method (docs/design.md §2.2): Cholesky b' = L L^T, M = L^{-1} a L^{-T}, symmetric eigendecomposition M = U W U^T,
// e = L^{-T} u. Eigenvalues come out descending, eigenvectors as columns with E^T b' E = I, and each
// eigenvector's largest-magnitude entry made positive so results are reproducible.
//
// Dead dimensions: a dimension whose diagonals in b and in a are both zero (to kDeadRelative of the largest)
// is a neuron with no variance at all; PSD scatter matrices then have zero rows there. It is taken out before
// the Cholesky factorisation and gets eigenvalue 0 and the coordinate vector as eigenvector (scaled by
// 1/sqrt(b'_jj) when the ridge makes b'_jj positive). A dimension with b_jj = 0 but a_jj > 0 (constant within
// each class, different between classes) is not dead: it is a perfect discriminant, an infinite eigenvalue
// without a ridge (a clear error) and a large finite one with it.
//
// Computation runs in float64 whatever the input dtype; results are returned in the promoted input dtype.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace gpp_ext {
namespace generalized_eigh_detail {

constexpr const char* kOp = "generalized_eigh";
constexpr double kDeadRelative = 1e-12;

// Solves the problem for a stack [k, n, n] whose b' is positive definite; eigenvalues descending. `entry` is
// the batch index of the first matrix, for the error message.
inline std::tuple<at::Tensor, at::Tensor> solve_definite(const at::Tensor& a, const at::Tensor& b_ridged,
                                                         int64_t entry = 0) {
  auto [chol, info] = at::linalg_cholesky_ex(b_ridged);
  if (info.ne(0).any().item<bool>()) {
    const int64_t first = entry + at::nonzero(info.ne(0)).select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, kOp, ": b (+ ridge) is not positive definite on its non-dead dimensions (batch entry ",
                      first, "); b is singular, e.g. fewer samples than dimensions, collinear features, or a "
                      "feature constant within every class but not across classes. Pass ridge > 0 (1e-3 is a "
                      "common choice) to regularise it.");
  }
  const at::Tensor x = at::linalg_solve_triangular(chol, a, /*upper=*/false);
  at::Tensor m = at::linalg_solve_triangular(chol, x.mT(), /*upper=*/false);
  m = (m + m.mT()).mul_(0.5);
  auto [w, u] = at::linalg_eigh(m);
  at::Tensor e = at::linalg_solve_triangular(chol.mT(), u, /*upper=*/true);
  return {w.flip({-1}), e.flip({-1})};
}

// One batch entry with dead dimensions: solve on the live block, then put the dead coordinates back.
inline std::tuple<at::Tensor, at::Tensor> solve_with_dead(const at::Tensor& a, const at::Tensor& b_ridged,
                                                          const at::Tensor& dead, int64_t entry) {
  const int64_t d = a.size(-1);
  const at::Tensor live = at::nonzero(dead.logical_not()).select(1, 0);
  const at::Tensor dead_idx = at::nonzero(dead).select(1, 0);
  const int64_t n_live = live.numel();
  at::Tensor values = at::zeros({d}, a.options());
  at::Tensor vectors = at::zeros({d, d}, a.options());
  if (n_live > 0) {
    const at::Tensor a_live = a.index_select(0, live).index_select(1, live);
    const at::Tensor b_live = b_ridged.index_select(0, live).index_select(1, live);
    auto [w, e] = solve_definite(a_live.unsqueeze(0), b_live.unsqueeze(0), entry);
    values.narrow(0, 0, n_live).copy_(w.squeeze(0));
    vectors.narrow(1, 0, n_live).index_copy_(0, live, e.squeeze(0));
  }
  if (dead_idx.numel() > 0) {
    const at::Tensor bjj = b_ridged.diagonal().index_select(0, dead_idx);
    const at::Tensor scale = at::where(bjj.gt(0), bjj.clamp_min(1e-300).rsqrt(), at::ones_like(bjj));
    const at::Tensor cols = at::arange(n_live, d, dead_idx.options());
    vectors.view({-1}).index_copy_(0, dead_idx * d + cols, scale);
  }
  // Dead eigenvalues are 0; a stable descending sort keeps live ties before dead ones.
  auto [sorted, order] = at::sort(values, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  return {sorted, vectors.index_select(1, order)};
}

inline void check_inputs(const at::Tensor& a, const at::Tensor& b, double ridge) {
  check_strided(a, kOp, "a");
  check_strided(b, kOp, "b");
  check_float_or_double(a, kOp, "a");
  check_float_or_double(b, kOp, "b");
  TORCH_CHECK_VALUE(a.dim() >= 2 && a.size(-1) == a.size(-2), kOp,
                    ": a must be a (batch of) square matrices [..., D, D], got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), kOp, ": b must have the shape of a ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_VALUE(std::isfinite(ridge) && ridge >= 0.0, kOp, ": ridge must be finite and >= 0, got ", ridge);
}

}  // namespace generalized_eigh_detail

// The whole op on any device: ATen's linear algebra (LAPACK on the CPU, cuSOLVER/MAGMA on a GPU) does the
// factorisations, so the data never leaves the device. Data-dependent decisions (a failed factorisation,
// dead dimensions) read a few flags back to the host.
inline std::tuple<at::Tensor, at::Tensor> generalized_eigh_impl(const at::Tensor& a_in, const at::Tensor& b_in,
                                                               double ridge) {
  using namespace generalized_eigh_detail;
  check_inputs(a_in, b_in, ridge);
  TORCH_CHECK_VALUE(a_in.device() == b_in.device(), kOp, ": a and b must be on the same device, got ",
                    a_in.device(), " and ", b_in.device());
  const auto out_dtype = c10::promoteTypes(a_in.scalar_type(), b_in.scalar_type());
  const int64_t d = a_in.size(-1);
  std::vector<int64_t> value_shape(a_in.sizes().begin(), a_in.sizes().end() - 1);
  if (a_in.numel() == 0) {
    return {at::empty(value_shape, a_in.options().dtype(out_dtype)),
            at::empty(a_in.sizes(), a_in.options().dtype(out_dtype))};
  }
  at::Tensor a = a_in.to(at::kDouble).reshape({-1, d, d});
  at::Tensor b = b_in.to(at::kDouble).reshape({-1, d, d});
  a = (a + a.mT()).mul_(0.5);
  b = (b + b.mT()).mul_(0.5);
  const at::Tensor diag = b.diagonal(0, -2, -1);
  const at::Tensor largest = diag.abs().amax(-1, /*keepdim=*/true);
  const at::Tensor a_diag = a.diagonal(0, -2, -1).abs();
  const at::Tensor dead =
      diag.le(kDeadRelative * largest).logical_and(a_diag.le(kDeadRelative * a_diag.amax(-1, /*keepdim=*/true)));
  // Every data-dependent check in one read-back (one device sync on a GPU).
  const at::Tensor flags = at::stack({at::isfinite(a).all().logical_not(), at::isfinite(b).all().logical_not(),
                                      diag.lt(-kDeadRelative * largest).any(), dead.any()})
                               .cpu();
  const bool* flag = flags.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(!flag[0], kOp, ": a must be finite, found NaN or Inf");
  TORCH_CHECK_VALUE(!flag[1], kOp, ": b must be finite, found NaN or Inf");
  TORCH_CHECK_VALUE(!flag[2], kOp,
                    ": b must be positive semi-definite (a scatter or covariance matrix), found a negative diagonal");
  const at::Tensor shift = diag.sum(-1) * (ridge / static_cast<double>(d));
  const at::Tensor b_ridged = b + shift.view({-1, 1, 1}) * at::eye(d, b.options());

  at::Tensor values, vectors;
  if (!flag[3]) {
    std::tie(values, vectors) = solve_definite(a, b_ridged);
  } else {
    std::vector<at::Tensor> vs, es;
    for (int64_t i = 0; i < a.size(0); ++i) {
      auto [w, e] = solve_with_dead(a[i], b_ridged[i], dead[i], i);
      vs.push_back(w);
      es.push_back(e);
    }
    values = at::stack(vs);
    vectors = at::stack(es);
  }
  // Sign convention: the largest-magnitude entry of each eigenvector is positive.
  const at::Tensor pivot = vectors.abs().argmax(-2, /*keepdim=*/true);
  at::Tensor sign = vectors.gather(-2, pivot).sign();
  sign = at::where(sign.eq(0), at::ones_like(sign), sign);
  vectors = vectors * sign;

  std::vector<int64_t> vector_shape(a_in.sizes().begin(), a_in.sizes().end());
  return {values.reshape(value_shape).to(out_dtype).contiguous(),
          vectors.reshape(vector_shape).to(out_dtype).contiguous()};
}

}  // namespace gpp_ext
