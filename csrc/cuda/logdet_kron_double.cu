// The fused kron_logdet kernels for double inputs (csrc/cuda/launch.h).
#include "cuda/launch.cuh"

namespace fastlaplace {
template void CudaLauncher::operator()(const fused::Plan&, const fused::KronTask<double>&) const;
}  // namespace fastlaplace
