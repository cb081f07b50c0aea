"""The GPU path: meta-learners and the posterior on CUDA agree with the CPU, the ops and a
whole LLAMA meta-iteration make no host synchronisation, and failures come back as NaN and
info codes. Every test here needs a CUDA device and the CUDA kernels (skipped otherwise)."""

import pytest
import torch
from helpers import dense_posterior_covariance, tiny_convnet, tiny_mlp

import fastlaplace as fl
from fastlaplace import LLAMA, MAML
from fastlaplace.data import SinusoidTasks

F64 = torch.float64
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() and fl.has_cuda()),
                                 reason="needs a CUDA device and CUDA kernels")]


def sinusoid_batch(device, tasks=4, dtype=F64):
    b = SinusoidTasks(support=10, query=5).sample(tasks, torch.Generator().manual_seed(0), dtype=dtype)
    return [t.to(device) for t in (b.x_support, b.y_support, b.x_query, b.y_query)]


def image_batch(device, tasks=3, ways=3):
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(tasks, ways, 1, 4, 4, generator=g, dtype=F64), torch.randn(tasks, 2 * ways, 1, 4, 4,
                                                                                    generator=g, dtype=F64)
    ys, yq = torch.arange(ways).repeat(tasks, 1), torch.arange(ways).repeat(tasks, 2)
    return [t.to(device) for t in (xs, ys, xq, yq)]


def learners(model):
    yield "maml", MAML(model, inner_lr=0.05, inner_steps=2)
    for method in ("factored", "exact"):
        yield f"llama-{method}", LLAMA(model, inner_lr=0.05, inner_steps=2, eta=0.1, tau=0.5, logdet_method=method)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_meta_gradient_on_cuda_equals_cpu(net):
    torch.manual_seed(0)
    model = (tiny_mlp() if net == "mlp" else tiny_convnet()).double()
    loss = "mse" if net == "mlp" else "cross_entropy"
    make = sinusoid_batch if net == "mlp" else image_batch
    for name, learner in learners(model):
        learner.loss = loss
        grads = {}
        for device in ("cpu", "cuda"):
            learner.to(device)
            out = learner.meta_loss(*make(device))
            grads[device] = torch.autograd.grad(out, list(learner.parameters()))
        for gc, gg in zip(grads["cpu"], grads["cuda"]):
            assert torch.allclose(gc, gg.cpu(), rtol=1e-8, atol=1e-10), name


def test_posterior_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = tiny_mlp().double()
    for method in ("factored", "exact"):
        learner = LLAMA(model, inner_lr=0.05, inner_steps=1, eta=0.1, tau=0.5, logdet_method=method)
        covs = {}
        for device in ("cpu", "cuda"):
            xs, ys, _, _ = sinusoid_batch(device)
            post = learner.to(device).posterior(xs, ys, tau=10.0)
            covs[device] = [dense_posterior_covariance(layer).cpu() for layer in post.layers]
            samples = post.sample(3)
            assert all(bool(torch.isfinite(v).all()) for v in samples.values())
        for c, g in zip(covs["cpu"], covs["cuda"]):
            assert torch.allclose(c, g, rtol=1e-8, atol=1e-12), method


def fused_and_large_inputs(dtype):
    """A sinusoid hidden layer (fused path) and a conv-like layer of order 577 (composite)."""
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(25, 10, 40, generator=g, dtype=dtype).cuda().requires_grad_() for _ in range(2)]
    large = [torch.randn(2, 700, 576, generator=g, dtype=dtype).cuda().requires_grad_(),
             torch.randn(2, 700, 64, generator=g, dtype=dtype).cuda().requires_grad_()]
    return small, large


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_make_no_host_sync(dtype):
    small, large = fused_and_large_inputs(dtype)
    cases = [(small, "factored"), (small, "exact"), (large, "factored")]
    for (a, g), method in cases:  # warm up: allocator and handles
        fl.kfac_logdet(a, g, float(a.shape[1]), 0.1, method, check=False).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (a, g), method in cases:
            fl.kfac_logdet(a, g, float(a.shape[1]), 0.1, method, check=False).sum().backward()
            A, G = fl.kron_factors(a.detach(), g.detach())
            A.requires_grad_()
            fl.kron_logdet(A, G, float(a.shape[1]), 0.1, method, check=False).sum().backward()
            fl.damped_cholesky(A.detach(), 0.1, check=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_llama_meta_iteration_makes_no_host_sync():
    model = tiny_mlp().cuda()
    learner = LLAMA(model, inner_lr=0.01, inner_steps=1, eta=1e-3, tau=1.0, check_finite=False)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batch = sinusoid_batch("cuda", tasks=25, dtype=torch.float32)
    for sync_mode in (0, "error"):  # the first iteration warms up
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            parts = learner.meta_objective(*batch)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_failures_come_back_as_nan_and_info_on_cuda():
    M = -torch.eye(4, dtype=F64, device="cuda").expand(3, 4, 4).contiguous()
    M[0] = torch.eye(4)
    L, logdet, info = torch.ops.fastlaplace.damped_cholesky(M, torch.full((3,), 0.5, dtype=F64, device="cuda"))
    assert info.tolist() == [0, 1, 1] and torch.isnan(logdet[1:]).all() and torch.isfinite(logdet[0])
    a = torch.randn(2, 5, 3, dtype=F64, device="cuda")
    a[1, 0, 0] = float("nan")
    g = torch.randn(2, 5, 2, dtype=F64, device="cuda")
    for method in ("factored", "exact"):
        out = torch.ops.fastlaplace.kfac_logdet(a, g, 5.0, 1.0, method, True)
        assert torch.isfinite(out[0]) and torch.isnan(out[1])
        with pytest.raises(ValueError, match="a contains NaN or Inf"):
            fl.kfac_logdet(a, g, 5.0, 1.0, method)


@pytest.mark.parametrize("n", [1, 33, 64])
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_fused_ops_are_one_launch_without_host_sync(n, method):
    """Orders <= 64: each log-det op, with its gradients, is one kernel (the fused task
    kernel, counted by the profiler) and makes no host synchronisation; its values and
    gradients equal the CPU kernels'."""
    g = torch.Generator().manual_seed(n)
    a, gg = torch.randn(4, n, n + 3, generator=g, dtype=F64), torch.randn(4, n, 2, generator=g, dtype=F64)
    X = torch.randn(4, n, n + 2, generator=g, dtype=F64)
    A, G = X @ X.mT / (n + 2), torch.eye(3, dtype=F64).expand(4, 3, 3) * 0.5
    calls = {"kfac": (torch.ops.fastlaplace.kfac_logdet_and_grad, (a, gg, float(n), 0.1, method, True)),
             "kron": (torch.ops.fastlaplace.kron_logdet_and_grad, (A, G, 5.0, 0.1, method))}
    for name, (op, args) in calls.items():
        cuda_args = [x.cuda() if isinstance(x, torch.Tensor) else x for x in args]
        op(*cuda_args)  # warm up: the kernel's shared-memory opt-in, the allocator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                got = op(*cuda_args)
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 1 and "fused_tasks" in kernels[0], (name, kernels)
        for x, y in zip(got, op(*args)):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-9, atol=1e-9)
