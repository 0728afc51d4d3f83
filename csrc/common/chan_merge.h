// Chan's parallel merge of two partial per-class moments, the "combine" step of the scatter accumulator
// (in the spirit of ATen's WelfordOps). Scalar arithmetic only, so the CPU kernel and the CUDA kernel share it.
//
// For one class with partial counts na, nb and means ma, mb:
//   n = na + nb,  mean = (na*ma + nb*mb) / n,  and the within-class scatter gains
//   w * (ma - mb)(ma - mb)^T  with  w = na*nb / n.
// An empty class (n == 0) keeps a zero mean and adds nothing.
#pragma once

#include <c10/macros/Macros.h>

namespace gpp_ext {

struct ChanWeights {
  double fa;  // na / n
  double fb;  // nb / n
  double w;   // na * nb / n, the weight of the mean difference's outer product
};

C10_HOST_DEVICE inline ChanWeights chan_weights(double na, double nb) {
  const double n = na + nb;
  if (n <= 0.0) return {0.0, 0.0, 0.0};
  // Fractions rather than (na*ma + nb*mb)/n: no overflow for huge counts, exact when one side is empty.
  return {na / n, nb / n, na * (nb / n)};
}

C10_HOST_DEVICE inline double chan_mean(const ChanWeights& c, double ma, double mb) { return c.fa * ma + c.fb * mb; }

}  // namespace gpp_ext
