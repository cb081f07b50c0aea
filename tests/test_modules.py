"""Bring your own network: MAML and LLAMA on any nn.Module (residual, functional forward,
nested), batched over tasks, against a plain per-task autograd loop and module hooks."""

import copy
import logging
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastlaplace import LLAMA, MAML, resnet12
from fastlaplace import reference as ref
from fastlaplace.batched import ConvPlanner, TaskBatchedNetwork, param_key
from fastlaplace.curvature import support_rows
from fastlaplace.models import ResNet12
from fastlaplace.options import ConvStrategy

F64 = torch.float64


# ----------------------------------------------------------------------------- networks

class Residual(nn.Module):
    """Conv stem, a residual block whose BatchNorms keep running statistics (the default),
    a 1×1 shortcut, functional activations and pooling, a linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.shortcut = nn.Conv2d(3, 4, 1, bias=False)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        x = F.max_pool2d(F.relu(self.conv2(h) + self.shortcut(x)), 2)
        return self.head(torch.flatten(x, 1))


class Functional(nn.Module):
    """A forward of functional code: a gate, a parameter used directly (meta-learned, not
    adapted), a LayerNorm (idem), one Linear called twice (shared weights), a concatenation."""

    def __init__(self, hidden=4):
        super().__init__()
        self.inp = nn.Linear(1, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, hidden))
        self.out = nn.Linear(2 * hidden, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        g = torch.sigmoid(self.shared(h)) * self.scale
        h2 = self.norm(torch.tanh(self.shared(h * g)) + h)
        return self.out(torch.cat([h2, h * g], dim=-1))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inner = nn.Sequential(OrderedDict(fc=nn.Linear(d, d), act=nn.Tanh()))

    def forward(self, x):
        return x + self.inner(x)


class Head(nn.Module):
    def __init__(self, d, length):
        super().__init__()
        self.parts = nn.ModuleDict({"mix": nn.Linear(d, d), "out": nn.Linear(d * length, 1)})

    def forward(self, x):
        return self.parts["out"](torch.tanh(self.parts["mix"](x)).flatten(1))


class Nested(nn.Module):
    """Sequences [examples, 3, 2]: a projection applied at every position (Linear rows are
    (example, position)), a GRU (meta-learned, not adapted), a BatchNorm1d with running
    statistics, a ModuleList of residual blocks, a nested head in a ModuleDict."""

    def __init__(self, d=4, length=3, norm=True):
        super().__init__()
        self.enc = nn.ModuleDict({"proj": nn.Sequential(nn.Linear(2, d), nn.Tanh()),
                                  "rnn": nn.GRU(d, d, batch_first=True)})
        self.norm = nn.BatchNorm1d(d) if norm else nn.Identity()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = Head(d, length)

    def forward(self, x):
        h, _ = self.enc["rnn"](self.enc["proj"](x))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tiny_resnet12():
    return resnet12(1, 3, widths=(2, 3, 3, 4))


# ----------------------------------------------------------------------------- data

def classification(T=2, N=3, M=4, shape=(1, 4, 4), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, *shape, generator=g, dtype=F64), torch.randint(0, classes, (T, N), generator=g),
            torch.randn(T, M, *shape, generator=g, dtype=F64), torch.randint(0, classes, (T, M), generator=g))


def regression(T=3, N=5, M=4, shape=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(T, N, *shape, generator=g, dtype=F64), torch.randn(T, M, *shape, generator=g, dtype=F64)
    return xs, torch.randn(T, N, 1, generator=g, dtype=F64), xq, torch.randn(T, M, 1, generator=g, dtype=F64)


CASES = {  # network, batch, loss, Fisher
    "residual": (Residual, lambda: classification(), "cross_entropy", "empirical"),
    "resnet12": (tiny_resnet12, lambda: classification(N=2, M=3, shape=(1, 16, 16)), "cross_entropy", "empirical"),
    "functional": (Functional, lambda: regression(), "mse", "auto"),
    "nested": (Nested, lambda: regression(shape=(3, 2)), "mse", "auto"),
    # without BatchNorm: task-major rows, and LLAMA's one pass over support and query sets
    "nested-no-bn": (lambda: Nested(norm=False), lambda: regression(shape=(3, 2)), "mse", "auto"),
}


CONV_CASES = ("residual", "resnet12")
# Each convolutional network under both strategies (they must agree), the others once.
STRATEGY_CASES = [(case, strategy) for case in CASES
                  for strategy in (("grouped", "loop") if case in CONV_CASES else ("auto",))]


def build(case, seed=0):
    make, batch, loss, fisher = CASES[case]
    torch.manual_seed(seed)
    return make().double(), batch(), loss, fisher


# ----------------------------------------------------------------------------- the oracle

def hooked_rows(model, params, x, y, loss, names):
    """One task, a plain forward of the user's module with forward hooks on the layers
    ``names``: K-FAC rows (a, g) per layer (the rows of every call, concatenated), g of the
    summed NLL (one-output regression: the Gauss-Newton ∂f/∂s; classification: the observed
    labels)."""
    layers = [(name, model.get_submodule(name)) for name in names]
    seen = []

    def hook(name):
        def fn(module, args, out):
            seen.append((name, module, args[0], out))
        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    try:
        out = functional_call(model, params, (x,))
    finally:
        for h in handles:
            h.remove()
    nll = out.sum() if loss == "mse" else F.cross_entropy(out, y, reduction="sum")
    grads = torch.autograd.grad(nll, [s for *_, s in seen], create_graph=True)
    rows = {}
    for (name, module, inp, _), g in zip(seen, grads):
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                inp = F.pad(inp, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = 0
            else:
                padding = module.padding
            a = F.unfold(inp, module.kernel_size, module.dilation, padding, module.stride).transpose(1, 2)
            a, g = a.reshape(-1, a.shape[-1]), g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        else:
            a, g = inp.reshape(-1, inp.shape[-1]), g.reshape(-1, g.shape[-1])
        prev = rows.get(name)
        rows[name] = (a, g) if prev is None else (torch.cat([prev[0], a]), torch.cat([prev[1], g]))
    return [(name, module.bias is not None, *rows[name]) for name, module in layers]


def per_task_objective(model, batch, loss, adapted, lr, steps, eta=0.0, tau=1.0, method="factored"):
    """Mean over tasks of the MAML (eta = 0) or LLAMA objective, one task at a time, on a copy
    of the model (so that BatchNorm's running statistics, which a plain forward in train mode
    updates, are the copy's) called with the original's parameters."""
    xs, ys, xq, yq = batch
    plain = copy.deepcopy(model)
    lossfn = F.mse_loss if loss == "mse" else F.cross_entropy
    theta = dict(model.named_parameters())
    keys = [param_key(name, w) for name, m in adapted for w in ("weight", "bias") if getattr(m, w) is not None]
    total = 0
    for t in range(xs.shape[0]):
        phi = {k: theta[k] for k in keys}
        for _ in range(steps):
            inner = lossfn(functional_call(plain, {**theta, **phi}, (xs[t],)), ys[t])
            grads = torch.autograd.grad(inner, list(phi.values()), create_graph=True)
            phi = {k: v - lr * g for (k, v), g in zip(phi.items(), grads)}
        q = lossfn(functional_call(plain, {**theta, **phi}, (xq[t],)), yq[t])
        if eta:
            for _, bias, a, g in hooked_rows(plain, {**theta, **phi}, xs[t], ys[t], loss, [n for n, _ in adapted]):
                q = q + eta * ref.kfac_logdet(a[None], g[None], float(a.shape[0]), tau, method, bias=bias)[0]
        total = total + q
    return total / xs.shape[0]


def make_learner(cls, model, loss, fisher, **kwargs):
    common = dict(inner_lr=0.05, inner_steps=2, loss=loss, **kwargs)
    if cls is LLAMA:
        return LLAMA(model, eta=0.01, tau=0.5, fisher=fisher, **common)
    return MAML(model, **common)


# ----------------------------------------------------------------------------- meta-gradients

@pytest.mark.parametrize("cls", [MAML, LLAMA])
@pytest.mark.parametrize("case,strategy", STRATEGY_CASES)
def test_meta_gradient_equals_per_task_loop(case, strategy, cls):
    model, batch, loss, fisher = build(case)
    learner = make_learner(cls, model, loss, fisher, logdet_method="exact", conv_strategy=strategy) \
        if cls is LLAMA else make_learner(cls, model, loss, fisher, conv_strategy=strategy)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    batched = learner.meta_loss(*batch)
    looped = per_task_objective(model, batch, loss, learner.net.adapted, 0.05, 2,
                                eta=0.01 if cls is LLAMA else 0.0, tau=0.5, method="exact")
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-11)
    params = [p for p in model.parameters()]
    for (name, _), gb, gl in zip(model.named_parameters(), torch.autograd.grad(batched, params),
                                 torch.autograd.grad(looped, params)):
        torch.testing.assert_close(gb, gl, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")
    for k, v in model.named_buffers():  # running statistics: never read nor updated
        assert torch.equal(v, buffers[k]), k
    assert not any("forward" in m.__dict__ for m in model.modules())  # no stand-in left behind


def test_what_is_adapted_by_default():
    nets = {case: TaskBatchedNetwork(build(case)[0]) for case in CASES}
    assert nets["residual"].adapted_layers == ["stem", "conv1", "conv2", "shortcut", "head"]
    assert nets["functional"].adapted_layers == ["inp", "shared", "out"]  # not: scale, norm
    assert nets["nested"].adapted_layers == ["enc.proj.0", "blocks.0.inner.fc", "blocks.1.inner.fc",
                                             "head.parts.mix", "head.parts.out"]  # not: the GRU, the BatchNorm
    assert len(nets["resnet12"].adapted_layers) == 17  # 16 convolutions and the head
    assert not nets["functional"].example_major and nets["nested"].example_major
    assert not nets["nested-no-bn"].example_major


def test_batchnorm_uses_task_statistics_in_eval_mode_and_leaves_running_statistics():
    model, batch, loss, fisher = build("residual")
    learner = MAML(model, inner_lr=0.05, inner_steps=1, loss=loss)
    train_mode = learner.meta_loss(*batch)
    model.eval()
    torch.testing.assert_close(learner.meta_loss(*batch), train_mode, rtol=0, atol=0)
    assert model.bn0.num_batches_tracked == 0 and torch.equal(model.bn0.running_mean, torch.zeros(3, dtype=F64))


# ----------------------------------------------------------------------------- K-FAC rows

@pytest.mark.parametrize("case,strategy", STRATEGY_CASES)
def test_kfac_rows_equal_module_hooks(case, strategy):
    model, (xs, ys, _, _), loss, fisher = build(case)
    net = TaskBatchedNetwork(model, conv_strategy=strategy)
    g = torch.Generator().manual_seed(1)
    params = {k: (p.unsqueeze(0) + 0.1 * torch.randn(xs.shape[0], *p.shape, generator=g, dtype=F64))
              for k, p in net.adapted_parameters().items()}
    rows = support_rows(net, params, xs, ys, "gaussian" if loss == "mse" else "categorical", fisher)
    assert [r.name for r, _, _ in rows] == net.adapted_layers
    theta = dict(model.named_parameters())
    for t in range(xs.shape[0]):
        want = hooked_rows(copy.deepcopy(model), {**theta, **{k: v[t] for k, v in params.items()}}, xs[t], ys[t],
                           loss, net.adapted_layers)
        for (record, a, g_rows), (name, bias, a_t, g_t) in zip(rows, want):
            assert record.name == name and record.bias == bias
            torch.testing.assert_close(a[t], a_t, rtol=1e-12, atol=1e-12, msg=lambda m: f"a of {name}: {m}")
            torch.testing.assert_close(g_rows[t], g_t, rtol=1e-10, atol=1e-12, msg=lambda m: f"g of {name}: {m}")


def test_auto_conv_strategy_measures_once_per_shape_and_records_its_choices(monkeypatch, caplog):
    model, batch, loss, _ = build("residual")
    measured = []

    def measure(self, x, w, b, args):
        measured.append((tuple(x.shape), tuple(w.shape)))
        return ConvStrategy.LOOP

    monkeypatch.setattr(ConvPlanner, "_measure", measure)
    learner = MAML(model, inner_lr=0.05, inner_steps=2, loss=loss, conv_strategy="auto")
    with caplog.at_level(logging.INFO, logger="fastlaplace"):
        learner.meta_loss(*batch)
        learner.meta_loss(*batch)
    T, N, M = batch[0].shape[0], batch[0].shape[1], batch[2].shape[1]
    assert len(measured) == len(set(measured)) == 2 * 4  # (support, query) × four layers; not again
    choices = learner.conv_choices()
    assert list(choices) == ["stem", "conv1", "conv2", "shortcut"]
    assert choices["stem"] == {str([N * T, 1, 4, 4]): "loop", str([M * T, 1, 4, 4]): "loop"}
    assert sum("runs 'loop'" in r.getMessage() for r in caplog.records) == 4 * 2  # each layer and shape once
    fixed = MAML(model, inner_lr=0.05, inner_steps=2, loss=loss, conv_strategy="grouped")
    fixed.meta_loss(*batch)
    assert len(measured) == 8 and set(fixed.conv_choices()["stem"].values()) == {"grouped"}
    with pytest.raises(ValueError, match=r"conv_strategy must be one of \('grouped', 'loop', 'auto'\)"):
        MAML(model, conv_strategy="unfold")


def test_auto_conv_strategy_measures_for_real():
    model, batch, loss, _ = build("residual")
    learner = MAML(model, inner_lr=0.05, inner_steps=1, loss=loss, conv_strategy="auto")
    reference = MAML(model, inner_lr=0.05, inner_steps=1, loss=loss, conv_strategy="grouped")
    torch.testing.assert_close(learner.meta_loss(*batch), reference.meta_loss(*batch), rtol=1e-12, atol=1e-12)
    assert all(set(shapes.values()) <= {"grouped", "loop"} for shapes in learner.conv_choices().values())
    fresh = MAML(model, inner_lr=0.05, inner_steps=1, loss=loss, conv_strategy="auto")
    with torch.inference_mode():  # measured with gradients all the same, on a copy of the inputs
        params = fresh.adapt(*batch[:2])
        torch.testing.assert_close(fresh.predict(params, batch[2]), reference.predict(params, batch[2]))
    assert len(fresh.conv_choices()["stem"]) == 2


def test_conv_strategies_agree(device):
    """On each device, in float64: LLAMA's objective, its meta-gradient and the K-FAC rows."""
    model, batch, loss, fisher = build("resnet12")
    model, batch = model.to(device), tuple(t.to(device) for t in batch)
    results = {}
    for strategy in ("grouped", "loop", "auto"):
        learner = make_learner(LLAMA, model, loss, fisher, conv_strategy=strategy)
        objective = learner.meta_loss(*batch)
        params = {k: v.detach() for k, v in learner.adapt(*batch[:2]).items()}
        rows = support_rows(learner.net, params, *batch[:2], "categorical", fisher)
        results[strategy] = [objective, *torch.autograd.grad(objective, list(model.parameters())),
                             *(t for _, a, g in rows for t in (a, g))]
    for strategy in ("loop", "auto"):
        for want, got in zip(results["grouped"], results[strategy]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [MAML, LLAMA])
@pytest.mark.parametrize("case,chunk", [("residual", 1), ("nested", 2), ("nested-no-bn", 2)])
@pytest.mark.parametrize("recompute", [False, True])
def test_task_chunks_agree_with_all_tasks_at_once(case, chunk, cls, recompute):
    """In float64: the objective, its second-order meta-gradient, φ̂ and the predictions
    (3 tasks in chunks of 2: one chunk is short), also with the query pass recomputed in
    the backward (alone and with chunks)."""
    model, batch, loss, fisher = build(case)
    results = []
    for task_chunk in (None, chunk) if not recompute else (None, chunk, None):
        learner = make_learner(cls, model, loss, fisher, task_chunk=task_chunk,
                               recompute_query=recompute and len(results) > 0)
        objective = learner.meta_loss(*batch)
        with torch.no_grad():
            params = learner.adapt(*batch[:2])
            predictions = learner.predict(params, batch[2])
        results.append([objective, *torch.autograd.grad(objective, list(model.parameters())), *params.values(),
                        predictions])
    for other in results[1:]:
        for want, got in zip(results[0], other, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="task_chunk must be None or an integer >= 1"):
            MAML(model, task_chunk=bad)


def test_recompute_query_keeps_no_query_activations():
    model, batch, loss, fisher = build("residual")
    saved = {}
    for recompute in (False, True):
        learner = make_learner(MAML, model, loss, fisher, task_chunk=1, recompute_query=recompute)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            learner.meta_loss(*batch).backward()
        saved[recompute] = count[0]
    assert saved[True] < saved[False]
    # "auto" times its convolutions with autograd: outside the checkpoint, before it
    auto = make_learner(MAML, model, loss, fisher, conv_strategy="auto", task_chunk=1, recompute_query=True)
    reference = make_learner(MAML, model, loss, fisher)
    for _ in range(2):
        got, want = auto.meta_loss(*batch), reference.meta_loss(*batch)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(torch.autograd.grad(got, list(model.parameters())),
                        torch.autograd.grad(want, list(model.parameters()))):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_layer_called_twice_has_the_rows_of_both_calls():
    model, (xs, ys, _, _), _, _ = build("functional")
    net = TaskBatchedNetwork(model)
    params = {k: p.unsqueeze(0).expand(xs.shape[0], *p.shape) for k, p in net.adapted_parameters().items()}
    rows = {r.name: (a, g) for r, a, g in support_rows(net, params, xs, ys, "gaussian")}
    assert rows["shared"][0].shape[1] == 2 * xs.shape[1] and rows["inp"][0].shape[1] == xs.shape[1]


# ----------------------------------------------------------------------------- a subset (ANIL)

@pytest.mark.parametrize("cls", [MAML, LLAMA])
def test_head_only_adaptation(cls):
    model, batch, loss, fisher = build("residual")
    learner = make_learner(cls, model, loss, fisher, adapt=["head"])
    assert learner.net.adapted_layers == ["head"] and list(learner.adapt(*batch[:2])) == ["head.weight", "head.bias"]
    batched = learner.meta_loss(*batch)
    looped = per_task_objective(model, batch, loss, learner.net.adapted, 0.05, 2,
                                eta=0.01 if cls is LLAMA else 0.0, tau=0.5)
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-11)
    params = list(model.parameters())
    for gb, gl in zip(torch.autograd.grad(batched, params), torch.autograd.grad(looped, params)):
        torch.testing.assert_close(gb, gl, rtol=1e-7, atol=1e-10)
    by_predicate = make_learner(cls, model, loss, fisher, adapt=lambda name, m: name == "head")
    torch.testing.assert_close(by_predicate.meta_loss(*batch), batched, rtol=0, atol=0)


def test_posterior_and_laplace_term_over_the_subset():
    model, (xs, ys, xq, _), loss, fisher = build("nested")
    learner = LLAMA(model, inner_lr=0.05, inner_steps=1, tau=0.5, adapt=["head"], logdet_method="exact")
    post = learner.posterior(xs, ys)
    assert [layer.name for layer in post.layers] == ["head.parts.mix", "head.parts.out"]  # a container's layers
    assert set(post.sample(2)) == {"head.parts.mix.weight", "head.parts.mix.bias", "head.parts.out.weight",
                                   "head.parts.out.bias"}
    assert post.predict(xq, n_samples=3).samples.shape == (3, *xq.shape[:2], 1)
    phi = learner.adapt(xs, ys)
    theta = dict(model.named_parameters())
    want = torch.stack([
        sum(ref.kfac_logdet(a[None], g[None], float(a.shape[0]), 0.5, "exact", bias=bias)[0]
            for _, bias, a, g in hooked_rows(copy.deepcopy(model), {**theta, **{k: v[t] for k, v in phi.items()}},
                                             xs[t], ys[t], loss, learner.net.adapted_layers))
        for t in range(xs.shape[0])])
    torch.testing.assert_close(learner.laplace_logdet(phi, xs, ys), want, rtol=1e-9, atol=1e-9)


def test_the_model_itself_may_be_the_layer():
    xs, ys, xq, yq = regression()
    learner = LLAMA(nn.Linear(1, 1).double(), inner_lr=0.05, tau=0.5)
    assert learner.net.adapted_layers == [""] and list(learner.adapt(xs, ys)) == ["weight", "bias"]
    assert learner.meta_loss(xs, ys, xq, yq).isfinite()
    post = learner.posterior(xs, ys)
    assert set(post.sample(2)) == {"weight", "bias"} and post.predict(xq, n_samples=2).samples.shape == (2, 3, 4, 1)


# ----------------------------------------------------------------------------- named errors

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.body(self.emb(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.attn(x, x, x)[0].mean(1))


class OwnLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class OwnNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x)


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 2))
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return x + self.fc(self.query)  # the adapted layer sees a row that is no example


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x):
        self.bn(self.fc(x))
        raise RuntimeError("the user's forward failed")


def test_layers_that_cannot_be_adapted_are_named():
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\) shares its weight with 'emb' \(tied weights\)"):
        MAML(Tied())
    MAML(Tied(), adapt=["body"])  # the tied head stays shared: fine
    with pytest.raises(ValueError, match=r"\['attn.out_proj'\] were not called as modules"):
        MAML(Attention().double()).meta_loss(*regression(shape=(3, 4)))
    assert MAML(Attention().double(), adapt=["out"]).meta_loss(*regression(shape=(3, 4))).isfinite()
    with pytest.raises(TypeError, match=r"layer '1.1' \(OwnLinear\) is a Linear with its own forward"):
        MAML(nn.Sequential(nn.Linear(1, 2), nn.Sequential(nn.ReLU(), OwnLinear(2, 1))))
    with pytest.raises(TypeError, match=r"layer 'conv' \(Conv2d\) is a grouped convolution"):
        MAML(nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 2, 3, groups=2))))
    with pytest.raises(TypeError, match=r"layer '1' \(OwnNorm\) overrides BatchNorm's forward"):
        MAML(nn.Sequential(nn.Conv2d(1, 2, 3), OwnNorm(2)))
    with pytest.raises(ValueError, match=r"layer 'fc' \(Linear\) received 1 rows in dimension 0, expected tasks × "
                                         r"examples = 3 × 5"):
        MAML(Constant()).meta_loss(*regression(shape=(2,)))
    with pytest.raises(ValueError, match="lazy"):
        MAML(nn.Sequential(nn.LazyLinear(1)))
    with pytest.raises(ValueError, match="adapt names 'tail', which is not a module"):
        MAML(Functional(), adapt=["tail"])
    with pytest.raises(ValueError, match=r"adapt names layer 'norm' \(LayerNorm\), which neither is nor contains"):
        MAML(Functional(), adapt="norm")
    with pytest.raises(ValueError, match="selects no layer"):
        MAML(Functional(), adapt=lambda name, module: False)
    patched = Functional().double()
    patched.out.forward = lambda x: x.sum(-1, keepdim=True)  # as some wrapper libraries do
    with pytest.raises(TypeError, match=r"layer 'out' \(Linear\) has its forward replaced on the instance"):
        MAML(patched).meta_loss(*regression())
    assert not any("forward" in m.__dict__ for m in patched.modules() if m is not patched.out)
    broken = Broken().double()
    with pytest.raises(RuntimeError, match="the user's forward failed"):
        MAML(broken).meta_loss(*regression())
    assert not any("forward" in m.__dict__ for m in broken.modules())  # stand-ins removed on the error


def test_learner_copies_run_their_own_modules():
    model, batch, loss, fisher = build("functional")
    learner = MAML(model, inner_lr=0.05, loss=loss)
    twin = copy.deepcopy(learner)
    torch.testing.assert_close(twin.meta_loss(*batch), learner.meta_loss(*batch), rtol=0, atol=0)
    with torch.no_grad():
        twin.model.out.bias.add_(1.0)
    assert not torch.equal(twin.meta_loss(*batch), learner.meta_loss(*batch))


# ----------------------------------------------------------------------------- ResNet-12

def test_resnet12_shapes_and_size():
    model = resnet12()
    assert isinstance(model, ResNet12) and sum(p.numel() for p in model.parameters()) == 12_427_525
    assert [b.conv1.out_channels for b in model.blocks] == [64, 160, 320, 640]
    small = resnet12(3, 5, widths=(4, 6, 8, 10))
    assert small(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert resnet12(1, 20, widths=(2, 2, 2, 2))(torch.randn(2, 1, 28, 28)).shape == (2, 20)
    with pytest.raises(ValueError, match="at least 16×16"):
        small(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("cls", [MAML, LLAMA])
def test_resnet12_meta_trains(cls):
    torch.manual_seed(0)
    learner = cls(resnet12(1, 3, widths=(2, 3, 3, 4)), inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    xs, ys, xq, yq = (t.float() if t.is_floating_point() else t for t in classification(N=3, M=3, shape=(1, 16, 16)))
    before = [p.detach().clone() for p in learner.parameters()]
    for _ in range(2):
        parts = learner.meta_objective(xs, ys, xq, yq)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
    assert parts.loss.isfinite() and (parts.logdet is None) == (cls is MAML)
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))


# ----------------------------------------------------------------------------- the command line

def test_cli_meta_trains_resnet12_and_the_checkpoint_rebuilds_it(tmp_path):
    from fastlaplace import train as train_mod
    from fastlaplace.config import config_from_dict
    from fastlaplace.runs import load_for_evaluation, read_checkpoint

    out = tmp_path / "r12"
    args = ["--dataset", "digits", "--model", "resnet12", "--filters", "2", "--method", "llama", "--iterations", "2",
            "--meta-batch", "2", "--inner-steps", "1", "--test-inner-steps", "1", "--query", "1", "--eval-tasks", "2",
            "--out", str(out), "--no-progress"]
    result = train_mod.main(args)
    assert result["metric"] == "accuracy" and result["test"]["1"]["n"] == 2
    learner, problem, cfg = load_for_evaluation(str(out / "checkpoint.pt"))
    assert cfg.model == "resnet12" and isinstance(learner.model, ResNet12)
    assert [b.conv1.out_channels for b in learner.model.blocks] == [2, 5, 10, 20]
    saved = read_checkpoint(out / "checkpoint.pt")["learner"]
    assert all(torch.equal(v, saved[k]) for k, v in learner.state_dict().items())
    with pytest.raises(SystemExit, match="other settings of model"):  # the network is part of the problem
        train_mod.main(args[:2] + ["--model", "conv4", "--resume", "--out", str(out)])
    # A configuration saved before the model was a setting means the data set's default network.
    assert config_from_dict({"dataset": "digits"}, "old").model == "conv4"
    with pytest.raises(SystemExit, match="model 'resnet12' is not for sinusoid"):
        train_mod.main(["--model", "resnet12", "--out", str(tmp_path / "sin")])


def test_bench_meta_resnet12_rows_run(tmp_path):
    """The ResNet-12 rows of benchmarks/bench_meta.py run through (tiny widths), so that a GPU
    machine finds a script that works."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_meta.py"
    run = subprocess.run([sys.executable, str(script), "--reps", "0", "--conv-iterations", "0", "--resnet-iterations",
                          "1", "--resnet-warmup", "0", "--resnet-tasks", "2", "--resnet-steps", "1", "--resnet-query",
                          "1", "--resnet-widths", "2", "2", "2", "2", "--no-write"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MAML | " in run.stdout and "LLAMA (factored) | " in run.stdout and "GiB" in run.stdout
