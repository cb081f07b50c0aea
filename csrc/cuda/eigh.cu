// Symmetric eigendecomposition of a batch on CUDA with no host synchronisation: cuSOLVER's
// batched syev leaves its status in device memory, which nothing reads back (linalg.eigh
// checks it on the host, two syncs per call). Matrices it could not decompose get NaN
// eigenvalues, which the log-det turns into NaN results, as on the other paths.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>

#include <limits>
#include <vector>

#include "cuda/kernels.h"

namespace fastlaplace {
namespace {

void check_cusolver(cusolverStatus_t status, const char* what) {
  TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, "fastlaplace: ", what, " failed with cuSOLVER status ",
              static_cast<int>(status));
}

struct Params {  // cusolverDnParams_t, destroyed on every path out
  cusolverDnParams_t p = nullptr;
  Params() { check_cusolver(cusolverDnCreateParams(&p), "cusolverDnCreateParams"); }
  ~Params() { cusolverDnDestroyParams(p); }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> symmetric_eigh_cuda(const at::Tensor& K, bool vectors) {
  const c10::cuda::CUDAGuard guard(K.device());
  const int64_t B = K.size(0), n = K.size(1);
  // Row-major K is column-major Kᵀ: cuSOLVER's upper triangle is our lower one, and the
  // eigenvectors it writes as columns come back as our rows.
  auto V = K.clone(at::MemoryFormat::Contiguous);
  auto w = at::empty({B, n}, K.options());
  auto info = at::zeros({B}, K.options().dtype(at::kInt));
  const auto type = K.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  const auto jobz = vectors ? CUSOLVER_EIG_MODE_VECTOR : CUSOLVER_EIG_MODE_NOVECTOR;
  auto handle = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  Params params;
  size_t device_bytes = 0, host_bytes = 0;
  check_cusolver(
      cusolverDnXsyevBatched_bufferSize(handle, params.p, jobz, CUBLAS_FILL_MODE_UPPER, n, type, V.data_ptr(), n, type,
                                        w.data_ptr(), type, &device_bytes, &host_bytes, B),
      "cusolverDnXsyevBatched_bufferSize");
  auto device_ws = at::empty({static_cast<int64_t>(device_bytes)}, K.options().dtype(at::kByte));
  std::vector<char> host_ws(host_bytes);
  check_cusolver(cusolverDnXsyevBatched(handle, params.p, jobz, CUBLAS_FILL_MODE_UPPER, n, type, V.data_ptr(), n, type,
                                        w.data_ptr(), type, device_ws.data_ptr(), device_bytes, host_ws.data(),
                                        host_bytes, info.data_ptr<int>(), B),
                 "cusolverDnXsyevBatched");
  w = at::where((info != 0).unsqueeze(1), at::full_like(w, std::numeric_limits<double>::quiet_NaN()), w);
  return {w, V.mT()};
}

}  // namespace fastlaplace
