// The CUDA launcher of the fused ops (csrc/fused.h): one launch per op for the whole batch,
// one block per task. Declared here for the registrations (csrc/cuda/logdet.cpp); defined in
// launch.cuh and compiled once per task type and dtype (logdet_{kfac,kron}_{float,double}.cu),
// so that the four instantiations compile in parallel.
#pragma once
#include <ATen/core/Tensor.h>

#include "fused.h"

namespace fastlaplace {

struct CudaLauncher {
  at::Device device;
  explicit CudaLauncher(const at::Tensor& t) : device(t.device()) {}

  static fused::Thresholds thresholds() { return fused::cuda_thresholds(); }

  template <class Task>
  void operator()(const fused::Plan& plan, const Task& task) const;
};

extern template void CudaLauncher::operator()(const fused::Plan&, const fused::KfacTask<float>&) const;
extern template void CudaLauncher::operator()(const fused::Plan&, const fused::KfacTask<double>&) const;
extern template void CudaLauncher::operator()(const fused::Plan&, const fused::KronTask<float>&) const;
extern template void CudaLauncher::operator()(const fused::Plan&, const fused::KronTask<double>&) const;

}  // namespace fastlaplace
