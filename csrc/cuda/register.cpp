// CUDA registrations of the primitive kernels; the log-det ops register in
// csrc/cuda/logdet.cpp (fused path, composite above the GPU's thresholds).
#include <torch/library.h>

#include "cuda/kernels.h"

namespace fastlaplace {
TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_factors", &kron_factors_cuda);
  m.impl("damped_cholesky", &damped_cholesky_cuda);
}
}  // namespace fastlaplace
