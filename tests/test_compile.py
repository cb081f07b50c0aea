"""torch.compile(fullgraph=True) over every op and over a LLAMA meta-objective: no graph
breaks, and the same values and gradients as eager.

Backend ``aot_eager``: Dynamo traces the Python, then AOTAutograd traces the graph with the
ops' fake implementations and their autograd, as inductor does, without compiling C++
(inductor's C++ build of one op took 27 s on this project's 2-core machine; ``aot_eager``
2.8 s). CPU, tiny shapes. The meta-objective needs ``torch._dynamo.config.trace_autograd_ops``:
its inner loop takes gradients with ``torch.autograd.grad``, which Dynamo otherwise refuses
to trace (a graph break at every inner step, an error with fullgraph=True)."""

import pytest
import torch
import torch._dynamo

from fastlaplace import LLAMA, ops

F64 = torch.float64
BACKEND = "aot_eager"


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend=BACKEND)


def assert_same(fn, *inputs):
    """fn compiled and eager on float64 inputs: equal outputs and gradients of their sum."""
    results = []
    for f in (fn, compiled(fn)):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = f(*xs)
        out = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(sum(o.sum() for o in out), xs)
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


def test_every_op_compiles_with_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    a, gr = torch.randn(2, 5, 3, dtype=F64, generator=g), torch.randn(2, 5, 4, dtype=F64, generator=g)
    A, G = ops.kron_factors(a, gr)
    assert_same(lambda a, g: ops.kron_factors(a, g, True), a, gr)
    assert_same(lambda M, d: ops.damped_cholesky(M, d), A, torch.full((2,), 0.5, dtype=F64))
    for method in ("factored", "exact"):
        assert_same(lambda A, G: ops.kron_logdet(A, G, 5.0, 0.5, method), A, G)
        assert_same(lambda a, g: ops.kfac_logdet(a, g, 5.0, 0.5, method), a, gr)  # R = 5 > d_in + 1: factors
        assert_same(lambda a, g: ops.kfac_logdet(a[:, :2], g[:, :2], 2.0, 0.5, method), a, gr)  # Gram path


# torch 2.11's Dynamo cannot delete an attribute of a module instance (the stand-in forward
# the learner installs for a call; docs/design.md §9); 2.13 and 2.14 can (measured).
@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="Dynamo before torch 2.13 cannot remove a module instance's attribute (fullgraph)")
def test_llama_meta_objective_compiles_with_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    learner = LLAMA(net, inner_steps=2, eta=0.1, tau=1.0, logdet_method="exact")  # check_finite: skipped when compiling
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(3, n, 1, dtype=F64, generator=g) for n in (5, 5, 4, 4)]
    params = list(learner.parameters())
    want = learner.meta_objective(*batch)
    want_grads = torch.autograd.grad(want.loss, params)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = compiled(learner.meta_objective)(*batch)
    got_grads = torch.autograd.grad(got.loss, params)  # second order through the inner loop
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.logdet, want.logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-8, atol=1e-10)
