// discriminants, shared by the CPU and CUDA registrations: the top-k pairs of S_b e = lambda S_w' e from
// scatter statistics, S_w' = S_w + ridge * tr(S_w)/D * I, without the full D x D eigendecomposition.
//
// Method (docs/design.md §2.2, "the rank-aware solve"): S_b = M^T M with the rows of M [C, D] the centred class
// means scaled by sqrt(n_c), so it has rank <= C - 1. With S_w' = L L^T (one Cholesky factorisation) and
// Z = L^{-1} M^T [D, C], the problem becomes Z Z^T f = lambda f with e = L^{-T} f, whose non-zero eigenpairs are
// the singular pairs of the thin Z = U diag(s) V^T: lambda = s^2, f = U. Cost: one Cholesky (D^3/3), two
// triangular solves with C right-hand sides (D^2 C) and an SVD of [D, C] (D C^2), against ~9 D^3 for the full
// solve. Eigenvalues come out descending, eigenvectors as columns with E^T S_w' E = I, each one's
// largest-magnitude entry positive, as generalized_eigh's.
//
// Dead dimensions (no variance within nor between classes, to kDeadRelative of the largest) take no part: their
// rows and columns of S_w' are replaced by a diagonal entry from inside the live spectrum and their columns of M
// zeroed, so they decouple from the live block and the discriminants are zero on them.
//
// The data checks of generalized_eigh are computed here from the same factor, so the op factorises once; the
// kernel returns them as 14 float64 flags (gpp_ext/_checks.py EIGH_FLAGS) and the Python op raises from them
// after one read-back. When a flag fires the returned pairs are meaningless (never read).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/fmax.h>
#include <ATen/ops/frac.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/nan_to_num.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "common/checks.h"

namespace gpp_ext {
namespace discriminants_detail {

constexpr const char* kOp = "discriminants";
constexpr double kDeadRelative = 1e-12;      // as generalized_eigh (gpp_ext/_checks.py DEAD_RELATIVE)
constexpr double kConditionError = 1e-3;     // gpp_ext/_checks.py CONDITION_ERROR
constexpr double kRangeRelative = 1e-12;     // a singular value of Z this far below the largest is a zero one
constexpr int kConditionSteps = 4;           // gpp_ext/_checks.py _condition_estimate

// Lower bounds of the extreme eigenvalues of SPD `s` [D, D] from its Cholesky factor (a port of
// gpp_ext/_checks.py _condition_estimate, unbatched): lambda_max >= max(s_ii, L_ii^2, |s v|) and
// lambda_min <= min(L_ii^2, 1/|s^-1 w|) after a few steps of power and inverse iteration.
inline std::tuple<at::Tensor, at::Tensor> condition_estimate(const at::Tensor& s, const at::Tensor& chol) {
  const int64_t d = s.size(0);
  const at::Tensor pivots = chol.diagonal().square();
  const at::Tensor j = at::arange(d, s.options()).unsqueeze(-1);
  at::Tensor start = at::frac(at::sin(j * 12.9898 + 78.233) * 43758.5453) - 0.5;
  start = start / start.norm();
  at::Tensor high = at::maximum(s.diagonal().amax(), pivots.amax());
  at::Tensor inverse_norm = at::zeros_like(high);
  at::Tensor v = start, w = start;
  for (int step = 0; step < kConditionSteps; ++step) {
    const at::Tensor sv = at::matmul(s, v);
    at::Tensor norm = sv.norm();
    high = at::fmax(high, norm);
    v = sv / norm.clamp_min(1e-300);
    // s^-1 w by two triangular solves (LAPACK's potrs through cholesky_solve copies the factor: ~5x slower)
    const at::Tensor half = at::linalg_solve_triangular(chol, w, /*upper=*/false);
    const at::Tensor inv = at::linalg_solve_triangular(chol.mT(), half, /*upper=*/true);
    norm = inv.norm();
    inverse_norm = at::fmax(inverse_norm, norm);
    w = inv / norm.clamp_min(1e-300);
  }
  const at::Tensor low = at::minimum(pivots.amin(), 1.0 / inverse_norm);
  return {high, low};
}

inline void check_inputs(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& within, double ridge,
                         int64_t k) {
  check_strided(count, kOp, "count");
  check_strided(mean, kOp, "mean");
  check_strided(within, kOp, "within");
  check_double(count, kOp, "count");
  check_double(mean, kOp, "mean");
  check_double(within, kOp, "within");
  check_dim(count, 1, kOp, "count", "[C]");
  check_dim(mean, 2, kOp, "mean", "[C, D]");
  check_dim(within, 2, kOp, "within", "[D, D]");
  TORCH_CHECK_VALUE(mean.size(0) == count.size(0) && within.size(0) == mean.size(1) &&
                        within.size(1) == mean.size(1),
                    kOp, ": expected count [C], mean [C, D], within [D, D], got ", count.sizes(), ", ", mean.sizes(),
                    ", ", within.sizes());
  TORCH_CHECK_VALUE(count.device() == mean.device() && mean.device() == within.device(), kOp,
                    ": count, mean and within must be on one device, got ", count.device(), ", ", mean.device(),
                    ", ", within.device());
  TORCH_CHECK_VALUE(std::isfinite(ridge) && ridge >= 0.0, kOp, ": ridge must be finite and >= 0, got ", ridge);
  const int64_t most = std::min(mean.size(0), mean.size(1));
  TORCH_CHECK_VALUE(k >= 0 && k <= most, kOp, ": k must be in [0, min(C, D)] = [0, ", most, "], got ", k);
}

}  // namespace discriminants_detail

// The whole op on any device, through ATen's linear algebra (LAPACK on the CPU, cuSOLVER/MAGMA on a GPU); no
// read-back: the flags stay on the device until the Python op reads them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> discriminants_impl(const at::Tensor& count,
                                                                         const at::Tensor& mean,
                                                                         const at::Tensor& within, double ridge,
                                                                         int64_t k) {
  using namespace discriminants_detail;
  check_inputs(count, mean, within, ridge, k);
  const int64_t d = within.size(0);
  const auto opts = within.options();
  if (d == 0 || count.size(0) == 0) {
    return {at::zeros({k}, opts), at::zeros({d, k}, opts), at::zeros({14}, opts)};
  }
  // The checks of gpp_ext/_checks.py eigh_data, for a = S_b (symmetric by construction) and b = within.
  const at::Tensor size_w = at::maximum(within.amax(), within.amin().neg());
  const at::Tensor finite_w = at::isfinite(size_w);
  at::Tensor s = (within + within.mT()).mul_(0.5);
  // max|W - W^T| = 2 max|W - S| for S = (W + W^T)/2: no second pass over the transpose
  const at::Tensor asym = at::where(size_w.gt(0), (within - s).abs_().amax() * 2.0 / size_w.clamp_min(1e-300),
                                    at::zeros_like(size_w));
  const at::Tensor diag = s.diagonal().clone();
  const at::Tensor largest = diag.abs().amax();
  // S_b = M^T M, M = sqrt(n_c) (mean_c - mu): its diagonal decides which dimensions are dead.
  const at::Tensor n = count.sum();
  const at::Tensor mu = at::matmul(count, mean) / n.clamp_min(1.0);
  at::Tensor m = (mean - mu) * count.clamp_min(0.0).sqrt().unsqueeze(1);
  const at::Tensor between_diag = m.square().sum(0);
  // S_b must be finite too: finite means far apart (1e200) overflow its entries
  const at::Tensor finite_a =
      at::isfinite(count).all().logical_and(at::isfinite(mean).all()).logical_and(at::isfinite(between_diag).all());
  const at::Tensor dead =
      diag.le(largest * kDeadRelative).logical_and(between_diag.le(between_diag.amax() * kDeadRelative));
  const at::Tensor trace = diag.sum();
  const at::Tensor ridged = diag + trace * (ridge / static_cast<double>(d));
  at::Tensor fill = at::where(dead, at::full_like(diag, -std::numeric_limits<double>::infinity()), ridged).amax();
  fill = at::where(at::isfinite(fill), fill, at::ones_like(fill));
  const at::Tensor live = dead.logical_not().to(at::kDouble);
  // On the CPU a flag costs nothing to read, so the passes that only matter for dead dimensions or non-finite
  // input are skipped when there are none; on a GPU they always run (a read-back would be a sync).
  const bool cpu = s.is_cpu();
  const bool any_dead = !cpu || dead.any().item<bool>();
  const bool all_finite = cpu && finite_w.item<bool>() && finite_a.item<bool>();
  if (any_dead) s.mul_(live.unsqueeze(1)).mul_(live.unsqueeze(0));
  const at::Tensor new_diag = at::where(dead, fill.expand_as(diag), ridged);
  s.diagonal().copy_(new_diag);
  const at::Tensor usable = finite_w.logical_and(at::isfinite(new_diag).all());
  at::Tensor scale = new_diag.amax();
  scale = at::where(scale.gt(0).logical_and(at::isfinite(scale)), scale, at::ones_like(scale));
  s.div_(scale);
  if (!all_finite) s = at::nan_to_num(s, 0.0, 0.0, 0.0);  // it raises from its flag; keep LAPACK away from NaN
  auto [chol, info] = at::linalg_cholesky_ex(s);
  const at::Tensor failed = info.ne(0);
  auto [high, low] = condition_estimate(s, chol);
  const at::Tensor ignored = failed.logical_or(usable.logical_not());
  const at::Tensor cond = at::where(ignored, at::zeros_like(high), high / low.clamp_min(1e-300));
  const double c = kConditionError / std::numeric_limits<double>::epsilon() / 10.0;
  const at::Tensor extra = ((high - low * c) / (c - 1.0)).clamp_min(0.0);
  const at::Tensor needed =
      at::where(ignored.logical_or(trace.le(0)), at::zeros_like(trace),
                extra * scale * static_cast<double>(d) / trace.clamp_min(1e-300) + ridge);
  const at::Tensor zero = at::zeros_like(high);
  const at::Tensor flags = at::stack({finite_a.logical_not().to(at::kDouble), finite_w.logical_not().to(at::kDouble),
                                      zero, zero, asym.to(at::kDouble), zero,
                                      diag.lt(largest * -kDeadRelative).any().to(at::kDouble),
                                      usable.logical_not().logical_and(finite_w).to(at::kDouble),
                                      failed.to(at::kDouble), zero, cond, zero, needed,
                                      dead.any().to(at::kDouble)});

  // The solve, in the factor's scale: S_w' = scale * chol chol^T. A failed factor is replaced by the identity,
  // so the (unread) result stays finite.
  const at::Tensor factor = at::where(failed, at::eye(d, opts), chol) * scale.sqrt();
  if (any_dead) m = m * live.unsqueeze(0);
  if (!all_finite) m = at::nan_to_num(m, 0.0, 0.0, 0.0);
  at::Tensor z = at::linalg_solve_triangular(factor, m.mT(), /*upper=*/false);
  z = at::nan_to_num(z, 0.0, 0.0, 0.0);
  auto [u, sv, vh] = at::linalg_svd(z, /*full_matrices=*/false);
  const at::Tensor values = sv.narrow(0, 0, k).square();
  at::Tensor basis = u.narrow(1, 0, k);
  if (any_dead && k > 0) {
    // Z is zero on the dead rows, but the SVD's rotations leave round-off there: the dead entries of the columns
    // in Z's range are set to 0. The columns past its rank (zero singular values) are any orthonormal completion
    // and may use the dead rows: masking those would shrink them and break E^T (S_w + ridge) E = I.
    const at::Tensor in_range = sv.narrow(0, 0, k).gt(sv.amax() * kRangeRelative);
    basis = at::where(in_range.unsqueeze(0), basis * live.unsqueeze(1), basis);
  }
  at::Tensor vectors = at::linalg_solve_triangular(factor.mT(), basis, /*upper=*/true);
  // Sign convention: the largest-magnitude entry of each eigenvector is positive.
  if (k > 0) {
    const at::Tensor pivot = vectors.abs().argmax(0, /*keepdim=*/true);
    at::Tensor sign = vectors.gather(0, pivot).sign();
    sign = at::where(sign.eq(0), at::ones_like(sign), sign);
    vectors = vectors * sign;
  }
  return {values.contiguous(), vectors.contiguous(), flags};
}

}  // namespace gpp_ext
