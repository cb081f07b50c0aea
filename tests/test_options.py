"""The options module: every option accepts its string or its member, one check lists the
choices, and every place that takes an option uses it."""

import typing

import pytest
import torch

from fastlaplace import LLAMA, MAML, ops, options, reference
from fastlaplace.options import FisherType, ImplicitPrior, Likelihood, LogdetMethod, Loss, choices, parse
from fastlaplace.prior import Prior


def test_strings_and_members_parse_to_members():
    assert parse(LogdetMethod, "exact", "method") is LogdetMethod.EXACT
    assert parse(LogdetMethod, LogdetMethod.FACTORED, "method") is LogdetMethod.FACTORED
    assert LogdetMethod.EXACT == "exact" and f"{LogdetMethod.EXACT}" == "exact"
    assert str(ImplicitPrior.EARLY_STOPPING) == "early_stopping"
    assert choices(LogdetMethod) == ("factored", "exact")
    assert choices(FisherType) == ("auto", "gauss_newton", "sampled", "empirical")
    assert Loss.MSE.likelihood is Likelihood.GAUSSIAN and Loss.CROSS_ENTROPY.likelihood is Likelihood.CATEGORICAL
    for bad in ("diagonal", None, 1, "EXACT", Loss.MSE):
        with pytest.raises(ValueError, match=r"method must be one of \('factored', 'exact'\), got"):
            parse(LogdetMethod, bad, "method")


def test_literal_hints_name_the_same_strings():
    for hint, kind in [(options.LogdetMethodLike, LogdetMethod), (options.FisherTypeLike, FisherType),
                       (options.LossLike, Loss), (options.ImplicitPriorLike, ImplicitPrior)]:
        members, literal = typing.get_args(hint)
        assert members is kind and typing.get_args(literal) == choices(kind)


def test_prior_method():
    exact, factored = LogdetMethod.EXACT, LogdetMethod.FACTORED
    assert Prior.of(1.0).method(None, factored) is factored
    assert Prior.of("early_stopping").method(None, factored) is exact
    assert Prior.of("early_stopping_first_order").method("exact", factored) is exact
    with pytest.raises(ValueError, match="needs method='exact'"):
        Prior.of("early_stopping").method(factored, exact)


def test_every_entry_point_uses_the_one_check():
    net = torch.nn.Sequential(torch.nn.Linear(1, 2))
    a, g = torch.randn(2, 3, 1), torch.randn(2, 3, 2)
    A, G = reference.kron_factors(a, g)
    calls = [
        ("method", lambda: ops.kfac_logdet(a, g, 3, 1.0, "diagonal")),
        ("method", lambda: ops.kron_logdet(A, G, 3, 1.0, "diagonal")),
        ("method", lambda: reference.kron_logdet(A, G, 3, 1.0, "diagonal")),
        ("logdet_method", lambda: LLAMA(net, logdet_method="diagonal")),
        ("fisher", lambda: LLAMA(net, fisher="hessian")),
        ("loss", lambda: MAML(net, loss="hinge")),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"{name} must be one of \("):
            call()
    # the members work wherever the strings do
    learner = LLAMA(net, logdet_method=LogdetMethod.EXACT, fisher=FisherType.EMPIRICAL, loss=Loss.MSE)
    assert learner.logdet_method == "exact" and type(learner.logdet_method) is str
    torch.testing.assert_close(ops.kron_logdet(A, G, 3, 1.0, LogdetMethod.EXACT),
                               ops.kron_logdet(A, G, 3, 1.0, "exact"))
