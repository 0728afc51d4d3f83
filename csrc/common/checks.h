// Argument checks shared by every kernel. Each message names the op, the argument and what was expected,
// and raises the Python exception a user expects: TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE ->
// ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace gpp_ext {

inline void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor for the CPU kernel, got ",
                    t.device());
}

inline void check_strided(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", arg, " must be a dense (strided) tensor, got layout ",
                   t.layout());
}

inline void check_float_or_double(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void check_double(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", arg,
                   " must be float64 (scatter statistics are kept in float64), got ", t.scalar_type());
}

inline void check_long(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

}  // namespace gpp_ext
