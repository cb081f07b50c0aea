// The fused kfac_logdet kernels for float inputs (csrc/cuda/launch.h).
#include "cuda/launch.cuh"

namespace fastlaplace {
template void CudaLauncher::operator()(const fused::Plan&, const fused::KfacTask<float>&) const;
}  // namespace fastlaplace
