// Autograd of the log-det ops, in C++: the Python-registered alternative cost about 0.3 ms
// per call in wrapper overhead, more than the kernels themselves at the sinusoid's sizes.
// When a gradient will be needed, the forward runs the *_and_grad op, which returns the
// log-det and its gradients for a unit upstream gradient in one pass; backward only scales
// them. The gradients are not differentiable: a backward with create_graph=True refuses.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastlaplace {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename... Args>
auto typed(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, Args...)>();
}

variable_list scaled_gradients(AutogradContext* ctx, const variable_list& grads, size_t n_inputs) {
  TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(),
                              "fastlaplace: the log-det ops are differentiable once; backward through them with "
                              "create_graph=True (a gradient of their gradient) is not supported");
  const auto saved = ctx->get_saved_variables();
  const auto scale = grads[0].reshape({-1, 1, 1});
  variable_list out(n_inputs);
  out[0] = at::mul(saved[0], scale);
  out[1] = at::mul(saved[1], scale);
  return out;
}

struct KfacLogdet : public torch::autograd::Function<KfacLogdet> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& g, double scale, double tau,
                        const std::string& method, bool bias) {
    static auto op = typed<double, double, const std::string&, bool>("fastlaplace::kfac_logdet_and_grad");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [logdet, da, dg] = op.call(a, g, scale, tau, method, bias);
    ctx->save_for_backward({da, dg});
    return logdet;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return scaled_gradients(ctx, grads, 6); }
};

struct KronLogdet : public torch::autograd::Function<KronLogdet> {
  static Tensor forward(AutogradContext* ctx, const Tensor& A, const Tensor& G, double scale, double tau,
                        const std::string& method) {
    static auto op = typed<double, double, const std::string&>("fastlaplace::kron_logdet_and_grad");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [logdet, dA, dG] = op.call(A, G, scale, tau, method);
    ctx->save_for_backward({dA, dG});
    return logdet;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return scaled_gradients(ctx, grads, 5); }
};

bool needs_grad(const Tensor& x, const Tensor& y) {
  return at::GradMode::is_enabled() && (x.requires_grad() || y.requires_grad());
}

Tensor kfac_logdet_autograd(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                            bool bias) {
  if (needs_grad(a, g)) return KfacLogdet::apply(a, g, scale, tau, method, bias);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlaplace::kfac_logdet", "")
                       .typed<Tensor(const Tensor&, const Tensor&, double, double, const std::string&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(a, g, scale, tau, method, bias);
}

Tensor kron_logdet_autograd(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
  if (needs_grad(A, G)) return KronLogdet::apply(A, G, scale, tau, method);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlaplace::kron_logdet", "")
                       .typed<Tensor(const Tensor&, const Tensor&, double, double, const std::string&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(A, G, scale, tau, method);
}

// The *_and_grad ops return gradients as values and are not differentiable themselves:
// their autograd kernel runs them below autograd, so their outputs never require grad.
std::tuple<Tensor, Tensor, Tensor> kfac_logdet_and_grad_autograd(const Tensor& a, const Tensor& g, double scale,
                                                                 double tau, const std::string& method, bool bias) {
  static auto op = typed<double, double, const std::string&, bool>("fastlaplace::kfac_logdet_and_grad");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(a, g, scale, tau, method, bias);
}

std::tuple<Tensor, Tensor, Tensor> kron_logdet_and_grad_autograd(const Tensor& A, const Tensor& G, double scale,
                                                                 double tau, const std::string& method) {
  static auto op = typed<double, double, const std::string&>("fastlaplace::kron_logdet_and_grad");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(A, G, scale, tau, method);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, Autograd, m) {
  m.impl("kfac_logdet", &kfac_logdet_autograd);
  m.impl("kron_logdet", &kron_logdet_autograd);
  m.impl("kfac_logdet_and_grad", &kfac_logdet_and_grad_autograd);
  m.impl("kron_logdet_and_grad", &kron_logdet_and_grad_autograd);
}

}  // namespace fastlaplace
