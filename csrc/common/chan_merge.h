// Chan's parallel merge of two partial per-class moments, the "combine" step of the scatter accumulator
// (in the spirit of ATen's WelfordOps). Plain arithmetic on raw pointers so the CPU kernel and a CUDA
// kernel can share it.
//
// For one class with partial counts na, nb and means ma, mb (length d):
//   n = na + nb,  mean = (na*ma + nb*mb) / n,  and the within-class scatter gains
//   w * (ma - mb)(ma - mb)^T  with  w = na*nb / n.
// An empty class (n == 0) keeps a zero mean and adds nothing.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace gpp_ext {

// Writes the merged mean into `mean`, the difference ma - mb into `delta`, and returns the weight w.
C10_HOST_DEVICE inline double chan_merge_class(double na, const double* ma, double nb, const double* mb,
                                               int64_t d, double* mean, double* delta) {
  const double n = na + nb;
  if (n <= 0.0) {
    for (int64_t j = 0; j < d; ++j) {
      mean[j] = 0.0;
      delta[j] = 0.0;
    }
    return 0.0;
  }
  const double fa = na / n;
  const double fb = nb / n;
  for (int64_t j = 0; j < d; ++j) {
    // fa*ma + fb*mb rather than (na*ma + nb*mb)/n: no overflow for huge counts, exact when one side is empty.
    mean[j] = fa * ma[j] + fb * mb[j];
    delta[j] = ma[j] - mb[j];
  }
  return na * fb;  // na*nb/n
}

}  // namespace gpp_ext
