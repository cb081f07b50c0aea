"""--cuda-graph (fastlaplace.graphs): a clear error on the CPU; on a GPU the captured step
equals the uncaptured one over 20 iterations, resumes exactly, and writes the checkpoints of
an uncaptured run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _cuda_ready
from test_train import Crash, final_parameters, small_config

from fastlaplace.graphs import any_nonfinite, portable_optimizer_state
from fastlaplace.problems import SinusoidProblem
from fastlaplace.runs import read_checkpoint
from fastlaplace.train import train

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and CUDA kernels")


def test_cuda_graph_on_the_cpu_is_one_error_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastlaplace.train", "--cuda-graph", "--iterations", "2",
                          "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith("error: --cuda-graph needs --device cuda")
    assert "Traceback" not in run.stderr


def test_any_nonfinite_is_a_device_flag():
    assert any_nonfinite([torch.ones(3), torch.zeros(2, dtype=torch.float64)]).tolist() == [0.0]
    assert any_nonfinite([torch.ones(3), torch.tensor([1.0, float("nan")])]).tolist() == [1.0]


def test_uncaptured_optimizer_state_is_saved_as_it_is():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    assert portable_optimizer_state(opt) == opt.state_dict()


def losses(out):
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["llama", "maml"])
def test_captured_step_equals_the_uncaptured_one(tmp_path, method):
    common = dict(device="cuda", method=method, iterations=20, checkpoint_every=10, log_every=5)  # read every 5th
    plain = small_config(tmp_path / "a", **common)
    graph = small_config(tmp_path / "b", cuda_graph=True, **common)
    train(plain, progress=False, evaluate_at_end=False)
    train(graph, progress=False, evaluate_at_end=False)
    # Capturable Adam does its bias correction on the device: rounding may differ in the last bits.
    assert losses(graph.out) == pytest.approx(losses(plain.out), rel=1e-4)
    a, b = final_parameters(plain.out), final_parameters(graph.out)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    saved = read_checkpoint(f"{graph.out}/checkpoint.pt")["optimizer"]  # as an uncaptured run writes it
    assert not saved["param_groups"][0]["capturable"]
    assert all(s["step"].device.type == "cpu" for s in saved["state"].values())


@pytest.mark.cuda
@needs_cuda
def test_captured_run_resumes_exactly(tmp_path, monkeypatch):
    straight = small_config(tmp_path / "a", device="cuda", cuda_graph=True)
    train(straight, progress=False, evaluate_at_end=False)
    calls, original = {"n": 0}, SinusoidProblem.sample

    def crashing_sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during iteration 6; the last checkpoint is at 4
            raise Crash()
        return original(self, *args, **kwargs)

    cfg = small_config(tmp_path / "b", device="cuda", cuda_graph=True)
    monkeypatch.setattr(SinusoidProblem, "sample", crashing_sample)
    with pytest.raises(Crash):
        train(cfg, progress=False, evaluate_at_end=False)
    monkeypatch.setattr(SinusoidProblem, "sample", original)
    train(cfg, resume=True, progress=False, evaluate_at_end=False)
    a, b = final_parameters(straight.out), final_parameters(cfg.out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the other way: a captured run's checkpoint continues without the graph
    uncaptured = small_config(tmp_path / "b", device="cuda", iterations=10)
    train(uncaptured, resume=True, progress=False, evaluate_at_end=False)
    assert read_checkpoint(f"{cfg.out}/checkpoint.pt")["iteration"] == 10
