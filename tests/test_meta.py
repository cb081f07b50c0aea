"""MAML and LLAMA batched over tasks, against plainly written per-task loops and finite differences."""

import pytest
import torch
import torch.nn.functional as F
from helpers import per_task_objective, tiny_convnet, tiny_mlp
from torch.func import functional_call

from fastlaplace import LLAMA, MAML
from fastlaplace.batched import TaskBatchedNetwork
from fastlaplace.data import SinusoidTasks
from fastlaplace.models import conv4, sinusoid_mlp

F64 = torch.float64


def sinusoid_batch(tasks=4, support=6, query=5, seed=0):
    b = SinusoidTasks(support=support, query=query).sample(tasks, torch.Generator().manual_seed(seed), dtype=F64)
    return b.x_support, b.y_support, b.x_query, b.y_query


def grads_of(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("method", [None, "factored", "exact"])
def test_batched_meta_gradient_equals_per_task_loop(steps, first_order, method):
    torch.manual_seed(0)
    model = tiny_mlp().double()
    batch = sinusoid_batch()
    if method is None:
        learner = MAML(model, inner_lr=0.02, inner_steps=steps, first_order=first_order)
        eta = 0.0
    else:
        eta = 0.05
        learner = LLAMA(model, inner_lr=0.02, inner_steps=steps, first_order=first_order, eta=eta, tau=0.5,
                        logdet_method=method)
    params = list(model.parameters())
    batched = learner.meta_loss(*batch)
    looped = per_task_objective(model, *batch, lr=0.02, steps=steps, first_order=first_order, eta=eta, tau=0.5,
                                method=method or "factored")
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    for gb, gl in zip(grads_of(batched, params), grads_of(looped, params)):
        torch.testing.assert_close(gb, gl, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("cls", ["maml", "llama-factored", "llama-exact"])
def test_meta_gradient_matches_finite_differences(steps, cls):
    torch.manual_seed(1)
    model = tiny_mlp(hidden=3).double()
    if cls == "maml":
        learner = MAML(model, inner_lr=0.05, inner_steps=steps)
    else:
        learner = LLAMA(model, inner_lr=0.05, inner_steps=steps, eta=0.1, tau=0.5, logdet_method=cls.split("-")[1])
    names = [n for n, _ in learner.named_parameters()]
    batch = sinusoid_batch(tasks=2, support=4, query=3)

    def fn(*values):
        return functional_call(learner, dict(zip(names, values)), batch)

    values = tuple(p.detach().clone().requires_grad_() for p in learner.parameters())
    assert torch.autograd.gradcheck(fn, values)


def test_eta_zero_gives_maml_exactly():
    batch = sinusoid_batch(tasks=5)
    torch.manual_seed(3)
    m1 = sinusoid_mlp().double()
    m2 = sinusoid_mlp().double()
    m2.load_state_dict(m1.state_dict())
    maml, llama = MAML(m1, inner_steps=2), LLAMA(m2, inner_steps=2, eta=0.0)
    l1, l2 = maml.meta_loss(*batch), llama.meta_loss(*batch)
    assert torch.equal(l1, l2)
    for g1, g2 in zip(grads_of(l1, list(m1.parameters())), grads_of(l2, list(m2.parameters()))):
        assert torch.equal(g1, g2)


class _LogdetOfTheta(torch.nn.Module):
    """θ ↦ log det Ĥ(φ̂(θ)) per task, for gradcheck through functional_call."""

    def __init__(self, learner):
        super().__init__()
        self.learner = learner

    def forward(self, xs, ys):
        return self.learner.laplace_logdet(self.learner.adapt(xs, ys), xs, ys)


@pytest.mark.parametrize("method", ["factored", "exact"])
def test_logdet_term_gradient_matches_finite_differences(method):
    torch.manual_seed(2)
    wrapper = _LogdetOfTheta(LLAMA(tiny_mlp(hidden=4).double(), inner_lr=0.05, tau=0.3, logdet_method=method))
    xs, ys, _, _ = sinusoid_batch(tasks=2, support=5)
    names = [n for n, _ in wrapper.named_parameters()]

    def fn(*values):
        return functional_call(wrapper, dict(zip(names, values)), (xs, ys))

    values = tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())
    assert torch.autograd.gradcheck(fn, values)


def test_task_batched_network_matches_module_per_task():
    torch.manual_seed(0)
    model = tiny_convnet().double()
    net = TaskBatchedNetwork(model)
    T, N = 3, 4
    x = torch.randn(T, N, 1, 4, 4, dtype=F64)
    params = {k: p.unsqueeze(0).expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape, dtype=F64)
              for k, p in net.adapted_parameters().items()}
    out, records = net(params, x, record=True)
    theta = dict(model.named_parameters())
    for t in range(T):
        expected = functional_call(model, {**theta, **{k: v[t] for k, v in params.items()}}, (x[t],))
        torch.testing.assert_close(out[t], expected)
    # KFC rows of the conv layer: unfolded patches, rows (example, location).
    conv = records[0]
    patches = F.unfold(x[1], 3, padding=1).transpose(1, 2).reshape(-1, 9)
    torch.testing.assert_close(conv.a[1], patches)
    # g rows: ∂(Σ r·out)/∂s of task 2, example 0, location (1, 1) = row 5, against a plain forward.
    r = torch.randn_like(out)
    g = conv.g_rows(torch.autograd.grad((out * r).sum(), conv.s)[0])
    theta2 = {**theta, **{k: v[2] for k, v in params.items()}}
    s = {}
    handle = model[0].register_forward_hook(lambda m, i, o: s.setdefault("s", o))
    try:
        plain = functional_call(model, theta2, (x[2],))
    finally:
        handle.remove()
    torch.testing.assert_close(g[2, 5], torch.autograd.grad((plain * r[2]).sum(), s["s"])[0][0, :, 1, 1])


@pytest.mark.parametrize("cls", [MAML, LLAMA])
def test_conv_learner_batched_equals_one_task_at_a_time(cls):
    torch.manual_seed(0)
    model = tiny_convnet().double()
    kwargs = dict(loss="cross_entropy", inner_lr=0.1, inner_steps=2)
    if cls is LLAMA:
        kwargs.update(eta=0.01, tau=0.5, fisher="empirical")
    learner = cls(model, **kwargs)
    T = 3
    xs, xq = torch.randn(T, 6, 1, 4, 4, dtype=F64), torch.randn(T, 4, 1, 4, 4, dtype=F64)
    ys, yq = torch.randint(0, 3, (T, 6)), torch.randint(0, 3, (T, 4))
    batched = learner.meta_loss(xs, ys, xq, yq)
    one_by_one = sum(learner.meta_loss(xs[t:t + 1], ys[t:t + 1], xq[t:t + 1], yq[t:t + 1]) for t in range(T)) / T
    torch.testing.assert_close(batched, one_by_one)
    params = list(model.parameters())
    for a, b in zip(grads_of(batched, params), grads_of(one_by_one, params)):
        torch.testing.assert_close(a, b)
    # MAML's conv learner against the plain per-task loop (BatchNorm not adapted).
    if cls is MAML:
        looped = per_task_objective(model, xs, ys, xq, yq, lr=0.1, steps=2, loss="cross_entropy")
        torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("cls", ["maml", "llama-factored", "llama-exact", "llama-conv"])
def test_meta_loss_in_evaluation_modes(cls, mode):
    """A validation loop under no_grad or inference_mode: same value, no graph (once
    LLAMA's one-pass path raised 'element 0 of tensors does not require grad')."""
    torch.manual_seed(0)
    context = getattr(torch, mode)
    if cls == "llama-conv":
        learner = LLAMA(tiny_convnet().double(), loss="cross_entropy", inner_lr=0.1, inner_steps=2, eta=0.01,
                        tau=0.5, fisher="empirical")
        T = 3
        make = lambda: (torch.randn(T, 6, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1)),
                        torch.randint(0, 3, (T, 6), generator=torch.Generator().manual_seed(2)),
                        torch.randn(T, 4, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3)),
                        torch.randint(0, 3, (T, 4), generator=torch.Generator().manual_seed(4)))
    else:
        model = tiny_mlp().double()
        learner = (MAML(model, inner_lr=0.02, inner_steps=2) if cls == "maml" else
                   LLAMA(model, inner_lr=0.02, inner_steps=2, eta=0.05, tau=0.5, logdet_method=cls.split("-")[1]))
        make = sinusoid_batch
    expected = learner.meta_objective(*make())
    with context():
        got = learner.meta_objective(*make())  # inputs made inside the mode, as a validation loop does
        phi = learner.adapt(*make()[:2])
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, expected.loss.detach())
    torch.testing.assert_close(got.query_loss, expected.query_loss.detach())
    if expected.logdet is not None:
        torch.testing.assert_close(got.logdet, expected.logdet.detach())
    assert all(not p.requires_grad for p in phi.values())


def test_conv4_shapes():
    assert conv4(3, 5, 84)(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert conv4(1, 20, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 20)
    assert conv4(3, 5, 84)[-1].in_features == 1600


# ------------------------------------------------------------------------- bad configuration

def test_bad_configuration_raises():
    model = sinusoid_mlp()
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(model, inner_lr=-0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(model, inner_steps=0)
    with pytest.raises(ValueError, match="tau"):
        LLAMA(model, tau=0)
    with pytest.raises(ValueError, match="eta"):
        LLAMA(model, eta=float("nan"))
    with pytest.raises(ValueError, match="logdet_method"):
        LLAMA(model, logdet_method="dense")
    with pytest.raises(TypeError, match="nn.Module"):
        MAML(lambda x: x)
    with pytest.raises(TypeError, match="grouped convolution"):  # more in tests/test_modules.py
        MAML(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2)))


def test_bad_batches_raise():
    learner = MAML(sinusoid_mlp())
    xs, ys, xq, yq = (t.float() for t in sinusoid_batch())
    with pytest.raises(ValueError, match="at least one task"):
        learner.meta_loss(xs[:0], ys[:0], xq[:0], yq[:0])
    with pytest.raises(ValueError, match="targets must be"):
        learner.meta_loss(xs, ys[:, :3], xq, yq)
    with pytest.raises(ValueError, match="tasks"):
        learner.meta_loss(xs, ys, xq[:2], yq[:2])
    with pytest.raises(ValueError, match="inputs must be"):
        learner.meta_loss(xs[0], ys[0], xq, yq)
    bad = xs.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learner.meta_loss(bad, ys, xq, yq)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        learner.meta_loss(bad, ys, xq, yq)
    huge = torch.full_like(xs, torch.finfo(xs.dtype).max)  # finite, but its sum overflows: accepted
    assert torch.isfinite(learner.adapt(huge, ys, steps=0)["0.weight"]).all()
