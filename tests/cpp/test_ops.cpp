// C++ tests of the gpp_ext CPU kernels, called through the PyTorch dispatcher exactly as torch.ops.gpp_ext.*
// would call them. Dependency-free on purpose (no gtest): each check prints `PASS name` or
// `FAIL name: reason`, the last line is `N passed, M failed`, and the exit status is non-zero on any failure.
//
// The ops are found by schema name, so this binary must load libgpp_ext_ops (linked with --no-as-needed)
// for its static initialisers to register them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using Stats = std::tuple<Tensor, Tensor, Tensor>;  // (count [C], mean [C, D], within [D, D])

int g_passed = 0;
int g_failed = 0;

// Records one check; returns 1 on failure so tests can sum their failures.
int expect(bool ok, const std::string& name, const std::string& reason = "") {
  if (ok) {
    ++g_passed;
    std::printf("PASS %s\n", name.c_str());
    return 0;
  }
  ++g_failed;
  std::printf("FAIL %s: %s\n", name.c_str(), reason.c_str());
  return 1;
}

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(3);
  s << std::scientific << v;
  return s.str();
}

// ||a - b||_F / ||b||_F in float64 (absolute when b is zero).
double rel_err(const Tensor& a, const Tensor& b) {
  const Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const double denom = b64.norm().item<double>();
  const double diff = (a64 - b64).norm().item<double>();
  return denom > 0.0 ? diff / denom : diff;
}

int expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& name) {
  if (got.sizes() != want.sizes()) {
    std::ostringstream s;
    s << "shape " << got.sizes() << " != expected " << want.sizes();
    return expect(false, name, s.str());
  }
  const double err = rel_err(got, want);
  return expect(err <= tol, name, "relative error " + fmt(err) + " > " + fmt(tol));
}

int expect_equal(const Tensor& got, const Tensor& want, const std::string& name) {
  const bool ok = got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type() && at::equal(got, want);
  return expect(ok, name, "tensors differ");
}

// ---- the ops, through the dispatcher -------------------------------------------------------------------

Stats class_scatter(const Tensor& x, const Tensor& y, int64_t num_classes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gpp_ext::class_scatter", "")
                             .typed<Stats(const Tensor&, const Tensor&, int64_t)>();
  return op.call(x, y, num_classes);
}

Stats merge_scatter(const Stats& a, const Stats& b) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gpp_ext::merge_scatter", "")
          .typed<Stats(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op.call(std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<0>(b), std::get<1>(b), std::get<2>(b));
}

std::tuple<Tensor, Tensor> generalized_eigh(const Tensor& a, const Tensor& b, double ridge) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gpp_ext::generalized_eigh", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double)>();
  return op.call(a, b, ridge);
}

Tensor slice_channels(const Tensor& t, int64_t dim, const Tensor& index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gpp_ext::slice_channels", "")
                             .typed<Tensor(const Tensor&, int64_t, const Tensor&)>();
  return op.call(t, dim, index);
}

Tensor deconv_backproject(const Tensor& signal, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, at::OptionalIntArrayRef output_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gpp_ext::deconv_backproject", "")
                             .typed<Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
                                           at::IntArrayRef, int64_t, at::OptionalIntArrayRef)>();
  return op.call(signal, weight, stride, padding, dilation, groups, output_size);
}

// ---- reference -----------------------------------------------------------------------------------------

// Two-pass per-class statistics in plain float64 loops: the definition, with no cancellation shortcut.
Stats naive_scatter(const Tensor& x_in, const Tensor& y_in, int64_t num_classes) {
  const Tensor x = x_in.to(at::kDouble).contiguous();
  const Tensor y = y_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const double* xp = x.const_data_ptr<double>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  std::vector<double> count(num_classes, 0.0), mean(num_classes * d, 0.0), within(d * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    count[yp[i]] += 1.0;
    for (int64_t j = 0; j < d; ++j) mean[yp[i] * d + j] += xp[i * d + j];
  }
  for (int64_t c = 0; c < num_classes; ++c) {
    for (int64_t j = 0; j < d && count[c] > 0.0; ++j) mean[c * d + j] /= count[c];
  }
  std::vector<double> centred(d);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) centred[j] = xp[i * d + j] - mean[yp[i] * d + j];
    for (int64_t r = 0; r < d; ++r) {
      for (int64_t s = 0; s < d; ++s) within[r * d + s] += centred[r] * centred[s];
    }
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  return {at::tensor(count, opts), at::tensor(mean, opts).view({num_classes, d}), at::tensor(within, opts).view({d, d})};
}

// Features with a large common offset: the case where X^T X - n mu mu^T would cancel catastrophically.
Tensor shifted_features(int64_t n, int64_t d, at::ScalarType dtype) {
  const Tensor scale = at::rand({1, d}, at::kDouble) * 3.0 + 0.5;
  return (at::randn({n, d}, at::kDouble) * scale + 1e4).to(dtype);
}

int compare_stats(const Stats& got, const Stats& want, double mean_tol, double within_tol, const std::string& name) {
  int failed = 0;
  failed += expect_equal(std::get<0>(got), std::get<0>(want), name + "/count");
  failed += expect_close(std::get<1>(got), std::get<1>(want), mean_tol, name + "/mean");
  failed += expect_close(std::get<2>(got), std::get<2>(want), within_tol, name + "/within");
  return failed;
}

// ---- tests ---------------------------------------------------------------------------------------------

int test_class_scatter_matches_naive() {
  // N spans several of the kernel's 4096-row Gram blocks, including a partial last one.
  const int64_t n = 9000, d = 24, c = 5;
  const Tensor y = at::randint(0, c, {n}, at::kLong);
  int failed = 0;
  const Tensor x32 = shifted_features(n, d, at::kFloat);
  // float32 input: means are float64 sums of the exact inputs; the Gram product runs in float32 on centred rows.
  failed += compare_stats(class_scatter(x32, y, c), naive_scatter(x32, y, c), 1e-12, 1e-5, "class_scatter_float32");
  const Tensor x64 = shifted_features(n, d, at::kDouble);
  failed += compare_stats(class_scatter(x64, y, c), naive_scatter(x64, y, c), 1e-10, 1e-10, "class_scatter_float64");
  return failed;
}

int test_class_scatter_streaming() {
  // Two partial statistics merged with Chan's formula equal one pass over all rows. The last class appears
  // only in the second part, so the merge also sees an empty partial class.
  const int64_t n_a = 3000, n_b = 5000, d = 16, c = 4;
  const Tensor x = shifted_features(n_a + n_b, d, at::kDouble);
  const Tensor y = at::cat({at::randint(0, c - 1, {n_a}, at::kLong), at::randint(0, c, {n_b}, at::kLong)});
  const Stats part_a = class_scatter(x.narrow(0, 0, n_a), y.narrow(0, 0, n_a), c);
  const Stats part_b = class_scatter(x.narrow(0, n_a, n_b), y.narrow(0, n_a, n_b), c);
  int failed = expect(std::get<0>(part_a)[c - 1].item<double>() == 0.0, "class_scatter_streaming/empty_class_in_a",
                      "test setup: the last class should be absent from the first part");
  failed += compare_stats(merge_scatter(part_a, part_b), class_scatter(x, y, c), 1e-10, 1e-10,
                          "class_scatter_streaming");
  return failed;
}

int test_class_scatter_bad_label() {
  const int64_t c = 3;
  const Tensor x = at::randn({10, 4}, at::kDouble);
  Tensor y = at::randint(0, c, {10}, at::kLong);
  y[7] = c;  // one past the last class
  const std::string name = "class_scatter_bad_label";
  try {
    class_scatter(x, y, c);
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what();
    return expect(msg.find("y must hold labels") != std::string::npos, name, "unexpected message: " + msg);
  } catch (const c10::Error& e) {
    return expect(false, name, std::string("raised a c10::Error that is not a ValueError: ") + e.what());
  }
  return expect(false, name, "no exception for label == num_classes");
}

int test_generalized_eigh() {
  // A batch of 3 problems: b random SPD, a symmetric PSD of rank 4 (so several eigenvalues are ~0).
  const int64_t batch = 3, d = 10, rank = 4;
  const Tensor r = at::randn({batch, d, d}, at::kDouble);
  const Tensor b = r.matmul(r.mT()) + at::eye(d, at::kDouble) * static_cast<double>(d);
  const Tensor s = at::randn({batch, d, rank}, at::kDouble);
  const Tensor a = s.matmul(s.mT());
  const auto [values, vectors] = generalized_eigh(a, b, /*ridge=*/0.0);
  const std::string name = "generalized_eigh";
  int failed = 0;
  failed += expect(values.sizes() == at::IntArrayRef({batch, d}) && vectors.sizes() == at::IntArrayRef({batch, d, d}),
                   name + "/shapes", "unexpected output shapes");
  // a E = b E diag(lambda), relative to the size of either side.
  const Tensor lhs = a.matmul(vectors);
  const Tensor rhs = b.matmul(vectors) * values.unsqueeze(-2);
  const double residual = (lhs - rhs).norm().item<double>() / (lhs.norm().item<double>() + rhs.norm().item<double>());
  failed += expect(residual < 1e-12, name + "/residual", "||aE - bE diag(lambda)|| relative " + fmt(residual));
  // E^T b E = I (b-orthonormal eigenvectors).
  const Tensor gram = vectors.mT().matmul(b).matmul(vectors);
  const double ortho = (gram - at::eye(d, at::kDouble)).abs().max().item<double>();
  failed += expect(ortho < 1e-10, name + "/b_orthonormal", "max |E^T b E - I| = " + fmt(ortho));
  const bool descending = values.narrow(-1, 0, d - 1).ge(values.narrow(-1, 1, d - 1)).all().item<bool>();
  failed += expect(descending, name + "/descending", "eigenvalues are not in descending order");
  return failed;
}

int test_slice_channels() {
  int failed = 0;
  const Tensor t = at::randn({4, 6, 5}, at::kFloat);
  // Any order, repeats allowed, as index_select.
  const Tensor index = at::tensor(std::vector<int64_t>{5, 0, 2, 2}, at::kLong);
  failed += expect_equal(slice_channels(t, 1, index), t.index_select(1, index), "slice_channels/dim1");
  failed += expect_equal(slice_channels(t, -1, index.narrow(0, 1, 3)), t.index_select(2, index.narrow(0, 1, 3)),
                         "slice_channels/negative_dim");
  // A non-contiguous integer tensor: the kernel copies raw bytes, whatever the dtype and layout.
  const Tensor ints = at::randint(-100, 100, {6, 7}, at::kInt).t();
  failed += expect_equal(slice_channels(ints, 0, index), ints.index_select(0, index), "slice_channels/int32_strided");
  return failed;
}

int test_deconv_backproject() {
  // The layer: a 3x3 conv, stride 2, padding 1, input 10x11 -> output 5x6. Back to 10x11 the transposed
  // convolution needs output_padding (1, 0), which the op must infer from output_size.
  const Tensor weight = at::randn({4, 3, 3, 3}, at::kDouble);  // [C_out, C_in, kH, kW]
  const Tensor signal = at::randn({2, 4, 5, 6}, at::kDouble);  // [B, C_out, H_out, W_out]
  const std::vector<int64_t> output_size{10, 11};
  const Tensor got = deconv_backproject(signal, weight, {2}, {1}, {1}, 1, at::IntArrayRef(output_size));
  const Tensor want = at::conv_transpose2d(signal, weight, /*bias=*/{}, /*stride=*/{2, 2}, /*padding=*/{1, 1},
                                           /*output_padding=*/{1, 0});
  return expect_close(got, want, 1e-12, "deconv_backproject/conv2d_stride2");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::pair<const char*, std::function<int()>>> tests = {
      {"class_scatter_matches_naive", test_class_scatter_matches_naive},
      {"class_scatter_streaming", test_class_scatter_streaming},
      {"class_scatter_bad_label", test_class_scatter_bad_label},
      {"generalized_eigh", test_generalized_eigh},
      {"slice_channels", test_slice_channels},
      {"deconv_backproject", test_deconv_backproject},
  };
  int failed_tests = 0;
  for (const auto& [name, fn] : tests) {
    try {
      failed_tests += fn() > 0;
    } catch (const std::exception& e) {
      // An op that is not registered (findSchemaOrThrow) or throws unexpectedly fails its test, not the run.
      failed_tests += 1;
      expect(false, name, std::string("unexpected exception: ") + e.what());
    }
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return failed_tests > 0 || g_failed > 0 ? 1 : 0;
}
