// The Python module fastlaplace._C: importing it runs the static TORCH_LIBRARY
// registrations of this shared library; build_info() says how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kfac_math.h"

namespace {
std::map<std::string, std::string> build_info() {
#ifdef FASTLAPLACE_WITH_CUDA
  const char* with_cuda = "1";
#else
  const char* with_cuda = "0";
#endif
  return {{"torch_version", FASTLAPLACE_TORCH_VERSION},
          {"with_cuda", with_cuda},
          {"cuda_architectures", FASTLAPLACE_CUDA_ARCHS}};
}

// The small-matrix eigensolver of the fused kernels, for tests: a row-major n×n symmetric
// matrix in, its eigenvalues and eigenvectors (columns, row-major) out.
std::pair<std::vector<double>, std::vector<double>> dense_eigh(std::vector<double> matrix, int64_t n) {
  if (n < 0 || static_cast<int64_t>(matrix.size()) != n * n)
    throw std::invalid_argument("matrix must have n*n entries");
  std::vector<double> w(n), work(n);
  if (!fastlaplace::math::eigh(matrix.data(), n, w.data(), true, work.data()))
    throw std::runtime_error("QL did not converge");
  return {w, matrix};
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlaplace compiled kernels (ops are registered under torch.ops.fastlaplace)";
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA, architectures.");
  m.def("_dense_eigh", &dense_eigh, "The fused kernels' symmetric eigensolver (for tests).");
}
