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


def test_channels_last_conv_loop_computes_the_plain_loops_meta_gradient(monkeypatch):
    """bench_meta's channels-last per-task loop is the same MAML as the plain one (the same
    meta-gradient from the same weights), only its memory format differs: a fair row."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    bench = runpy.run_path(str(BENCHMARKS_DIR / "bench_meta.py"))
    from fastlaplace import conv4

    batch = bench["random_episodes"](2, 32, 3, 2)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = conv4(3, 5, 32, 4).double()  # 32×32: a 2×2 map flattened for the classifier
        bench["per_task_conv_loop"](model, tuple(t.double() if t.is_floating_point() else t for t in batch),
                                    0.1, 2, memory_format)()
        grads.append([p.grad for p in model.parameters()])
        assert model[0].weight.is_contiguous(memory_format=memory_format)
    for plain, last in zip(*grads):
        assert torch.allclose(plain, last, rtol=1e-9, atol=1e-12)
