"""The benchmarks' own code: the plain-PyTorch baseline computes what the kernels compute,
and the GPU smoke test (benchmarks/gpu_smoke.py) runs through on the CPU, so that the first
GPU machine finds a script that works."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlaplace import reference as ref

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import baselines  # noqa: E402


@pytest.mark.parametrize("shape", [(25, 10, 1, 40), (3, 10, 40, 40), (2, 30, 5, 3), (2, 6, 70, 1)], ids=str)
@pytest.mark.parametrize("method", ["factored", "exact"])
def test_best_plain_pytorch_baseline_matches_reference(shape, method):
    B, R, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, R, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, R, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    got = baselines.kfac_logdet(a, b, float(R), 0.3, method)
    want = ref.kfac_logdet(a, b, float(R), 0.3, method)
    assert torch.allclose(got, want, rtol=1e-10)
    ga = torch.autograd.grad(got.sum(), (a, b))
    wa = torch.autograd.grad(want.sum(), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(ga, wa))


def test_gpu_smoke_script_runs_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_smoke.py"), "--device", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SUMMARY smoke: 0 failed" in run.stdout
