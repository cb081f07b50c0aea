"""The predictive metrics of fastlaplace.calibration on constructed cases with known values, and
the classification predictive: probit against Monte Carlo, in float64."""

import math

import pytest
import torch
from helpers import tiny_convnet

from fastlaplace import LLAMA
from fastlaplace.calibration import (
    BINS,
    accuracy,
    auroc,
    brier,
    entropy,
    fit_temperature,
    laplace_marginal_nll,
    nll,
    reliability,
)
from fastlaplace.posterior import Predictive
from fastlaplace.prior import Prior

F64 = torch.float64


def test_ece_and_mce_of_a_constructed_case():
    """100 points at confidence 0.9, all right (gap 0.1); 100 at confidence 0.4, 20 % right (gap 0.2):
    ECE = ½·0.1 + ½·0.2 = 0.15, MCE = 0.2."""
    sure = torch.tensor([0.9, 0.05, 0.05], dtype=F64).expand(100, 3)
    unsure = torch.tensor([0.4, 0.3, 0.3], dtype=F64).expand(100, 3)
    probs = torch.cat([sure, unsure]).reshape(4, 50, 3)  # 4 tasks of 50 points
    y = torch.cat([torch.zeros(100), torch.zeros(20), torch.ones(80)]).long().reshape(4, 50)
    rel = reliability(probs, y)
    assert rel.count.shape == (BINS,) and int(rel.count.sum()) == 200 and int((rel.count > 0).sum()) == 2
    assert rel.ece == pytest.approx(0.15, abs=1e-12) and rel.mce == pytest.approx(0.2, abs=1e-12)
    # perfectly calibrated: confidence equals accuracy in every bin
    half = torch.tensor([[0.5, 0.5]], dtype=F64).expand(10, 2).reshape(1, 10, 2)
    assert reliability(half, torch.tensor([[0, 1] * 5])).ece == pytest.approx(0.0, abs=1e-12)


def test_nll_brier_accuracy_entropy():
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]], dtype=F64)
    y = torch.tensor([[0, 2]])
    torch.testing.assert_close(nll(probs, y), torch.tensor([(-math.log(0.5) - math.log(0.1)) / 2], dtype=F64))
    expected = ((0.25 + 0.0625 + 0.0625) + (0.01 + 0.64 + 0.81)) / 2
    torch.testing.assert_close(brier(probs, y), torch.tensor([expected], dtype=F64))
    torch.testing.assert_close(accuracy(probs, y), torch.tensor([0.5], dtype=F64))
    uniform = torch.full((1, 1, 4), 0.25, dtype=F64)
    torch.testing.assert_close(entropy(uniform), torch.tensor([[math.log(4)]], dtype=F64))


def test_auroc():
    got = auroc(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.5, 3.0], [1.0, 1.0]]))
    torch.testing.assert_close(got, torch.tensor([5 / 6, 0.5], dtype=F64))


def test_fit_temperature_recovers_the_scale():
    g = torch.Generator().manual_seed(0)
    true = 2 * torch.randn(20, 200, 5, generator=g, dtype=F64)
    y = torch.multinomial(true.softmax(-1).reshape(-1, 5), 1, generator=g).reshape(20, 200)
    assert fit_temperature(3 * true, y) == pytest.approx(3.0, rel=0.1)


def classifier():
    torch.manual_seed(0)
    learner = LLAMA(tiny_convnet(classes=3).double(), inner_lr=0.1, inner_steps=2, loss="cross_entropy",
                    fisher="empirical")
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=F64)
    ys = torch.arange(3).repeat(2).view(1, 6).expand(2, 6).contiguous()
    return learner, xs, ys


def test_probit_against_monte_carlo_float64():
    """The probit approximation against the Monte-Carlo mean of softmax over many posterior samples
    of the linearised logits (float64); the samples are Gaussian around the mode f(φ̂)."""
    learner, xs, ys = classifier()
    post = learner.posterior(xs, ys, prior="early_stopping_first_order")
    assert all(layer.tau == pytest.approx(6 / (0.1 * 2)) for layer in post.layers)  # τ = N/(αK)
    pred = post.predict(xs, 20000, torch.Generator().manual_seed(2), chunk=2000)
    assert pred.samples.dtype == F64 and pred.mode.shape == (2, 6, 3)
    torch.testing.assert_close(pred.mean, pred.mode, atol=4 * float(pred.std.max()) / 20000**0.5, rtol=0)
    mc, probit = pred.probs("mc"), pred.probs("probit")
    torch.testing.assert_close(mc.sum(-1), torch.ones(2, 6, dtype=F64))
    torch.testing.assert_close(probit.sum(-1), torch.ones(2, 6, dtype=F64))
    assert float(pred.std.max()) > 0.3  # the posterior spreads the logits enough to matter
    assert float((mc - probit).abs().max()) < 0.03
    # both pull the probabilities towards uniform relative to the mode's softmax
    point = pred.mode.softmax(-1)
    assert bool((mc.max(-1).values <= point.max(-1).values + 1e-3).all())
    with pytest.raises(ValueError, match="'mc' or 'probit'"):
        pred.probs("laplace")
    with pytest.raises(ValueError, match="only a linearised predictive"):
        Predictive(pred.samples).rescaled(torch.ones(2))


def test_prior_values_resolve():
    learner, xs, ys = classifier()
    names = [layer.name for layer in learner.posterior(xs, ys).layers]
    per_layer = {name: float(i + 1) for i, name in enumerate(names)}
    post = learner.posterior(xs, ys, prior=per_layer)
    assert [layer.tau for layer in post.layers] == list(per_layer.values())
    with pytest.raises(ValueError, match="adapted layers are"):
        learner.posterior(xs, ys, prior={names[0]: 1.0})
    with pytest.raises(ValueError, match="chosen first"):
        learner.posterior(xs, ys, prior="validation")
    assert [str(p) for p in Prior.validation([1, 10]).candidates()] == ["tau=1", "tau=10"]
    assert Prior.of(Prior.of(2.0)) == Prior.of(2) and str(Prior.of("early_stopping")) == "early_stopping"
    for bad in (0.0, -1, float("nan"), True, "flat", {}):
        with pytest.raises(ValueError):
            Prior.of(bad)
    # the marginal likelihood takes every prior; a scalar's is the first-order one's at its τ
    torch.testing.assert_close(laplace_marginal_nll(learner, xs, ys, prior="early_stopping_first_order"),
                               laplace_marginal_nll(learner, xs, ys, prior=6 / (0.1 * 2)))
    assert bool(torch.isfinite(laplace_marginal_nll(learner, xs, ys, prior="early_stopping")).all())
