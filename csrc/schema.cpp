// Every op schema of the gpp_ext namespace, declared once. Each backend registers its kernels from its own
// file (csrc/cpu/*_cpu.cpp, csrc/cuda/*_cuda.cu); fake kernels and autograd are registered in Python
// (gpp_ext/ops.py). Argument names match the Python API so dispatcher errors read the same.
#include <torch/library.h>

TORCH_LIBRARY(gpp_ext, m) {
  // Per-class counts [C], means [C, D] and unnormalised within-class scatter [D, D], all float64.
  m.def("class_scatter(Tensor x, Tensor y, int num_classes) -> (Tensor, Tensor, Tensor)");
  // Gradient of class_scatter w.r.t. x, given the gradients of the mean and of the within-class scatter.
  m.def(
      "class_scatter_backward(Tensor grad_mean, Tensor grad_within, Tensor x, Tensor y, Tensor count, "
      "Tensor mean) -> Tensor");
  // Chan's exact merge of two partial statistics.
  m.def(
      "merge_scatter(Tensor count_a, Tensor mean_a, Tensor within_a, Tensor count_b, Tensor mean_b, "
      "Tensor within_b) -> (Tensor, Tensor, Tensor)");
  // Batched generalized symmetric eigenproblem a e = lambda (b + ridge tr(b)/D I) e, descending.
  m.def("generalized_eigh(Tensor a, Tensor b, float ridge) -> (Tensor, Tensor)");
  // Top-k pairs of S_b e = lambda (S_w + ridge tr(S_w)/D I) e from scatter statistics (rank-aware: one Cholesky
  // and an SVD of [D, C]), with generalized_eigh's 14 data-check flags.
  m.def(
      "discriminants(Tensor count, Tensor mean, Tensor within, float ridge, int k) -> (Tensor, Tensor, Tensor)");
  // Eigenvalue-weighted absolute loadings of the unit-normalised top-k discriminants.
  m.def("discriminant_utility(Tensor eigenvalues, Tensor eigenvectors, int? k) -> Tensor");
  // Per-neuron Fisher ratio S_b[j,j] / (S_w[j,j] + eps * tr(S_w + S_b)/D), with 0/0 read as 0.
  m.def("fisher_utility(Tensor count, Tensor mean, Tensor within, float eps) -> Tensor");
  // Transposed convolution (or transposed linear map) of a signal through a layer's weight.
  m.def(
      "deconv_backproject(Tensor signal, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "int groups, int[]? output_size) -> Tensor");
  // Contiguous copy of t keeping `index` along `dim`.
  m.def("slice_channels(Tensor t, int dim, Tensor index) -> Tensor");
}
