"""The benchmarks' baseline: the best plain-PyTorch log-det computes what the kernels compute."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from fastlaplace import reference as ref


@pytest.mark.parametrize("shape", [(25, 10, 1, 40), (3, 10, 40, 40), (2, 30, 5, 3), (2, 6, 70, 1)], ids=str)
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_best_plain_pytorch_baseline_matches_reference(shape, method):
    B, R, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, R, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, R, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    got = ref.plain_kfac_logdet(a, b, float(R), 0.3, method)
    want = ref.kfac_logdet(a, b, float(R), 0.3, method)
    assert torch.allclose(got, want, rtol=1e-10)
    ga = torch.autograd.grad(got.sum(), (a, b))
    wa = torch.autograd.grad(want.sum(), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(ga, wa))


BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARKS = sorted(p for p in BENCHMARKS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_script_imports_and_describes_itself(script, monkeypatch, capsys):
    """Each script loads (its imports and the package's names it uses at module level exist)
    and answers --help, in this process: a renamed API breaks here, not in a long run."""
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` sees its folder
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_uncertainty_tables_overconfidence_of_constructed_bins():
    """Mean confidence − accuracy over every query: two filled bins and an empty one,
    (10·(0.9 − 0.7) + 30·(0.5 − 0.6)) / 40 = −0.025."""
    tables = runpy.run_path(str(BENCHMARKS_DIR / "uncertainty_tables.py"))
    bins = {"count": [10, 0, 30], "confidence": [0.9, None, 0.5], "accuracy": [0.7, None, 0.6]}
    assert tables["overconfidence"](bins) == pytest.approx(-0.025)
