// The Python module fastlaplace._C: importing it runs the static TORCH_LIBRARY
// registrations of this shared library; build_info() says how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <map>
#include <string>

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
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlaplace compiled kernels (ops are registered under torch.ops.fastlaplace)";
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA, architectures.");
}
