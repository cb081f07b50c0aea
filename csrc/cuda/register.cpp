// CUDA registrations of the primitive kernels; the log-det ops register in
// csrc/cuda/logdet.cu (fused path, composite above order 64).
#include <torch/library.h>

#include "cuda/kernels.h"

namespace fastlaplace {
TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_factors", &kron_factors_cuda);
  m.impl("damped_cholesky", &damped_cholesky_cuda);
}
}  // namespace fastlaplace
