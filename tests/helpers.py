"""Plainly written per-task versions of the meta-learners: the oracle for the batched ones."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastlaplace import reference as ref


def mlp_logdet(model: nn.Sequential, params: dict, x, tau: float, method: str):
    """log det Ĥ of one task for an MLP, Gauss-Newton Fisher of its single output."""
    h, inputs, pre = x, [], []
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    for i, (name, _) in enumerate(linears):
        inputs.append(h)
        s = h @ params[f"{name}.weight"].T + params[f"{name}.bias"]
        pre.append(s)
        h = torch.relu(s) if i < len(linears) - 1 else s
    grads = torch.autograd.grad(h.sum(), pre, create_graph=True)
    R = x.shape[0]
    return sum(ref.kfac_logdet(a[None], g[None], R, tau, method)[0] for a, g in zip(inputs, grads))


def per_task_objective(model, xs, ys, xq, yq, lr, steps, first_order=False, eta=0.0, tau=1.0, method="factored",
                       loss="mse"):
    """Mean over tasks of the MAML (eta=0) or LLAMA objective, one task at a time."""
    lossfn = F.mse_loss if loss == "mse" else F.cross_entropy
    theta = dict(model.named_parameters())
    total = 0
    for t in range(xs.shape[0]):
        phi = {k: v for k, v in theta.items() if not k.startswith(_batchnorm_prefixes(model))}
        for _ in range(steps):
            l = lossfn(functional_call(model, {**theta, **phi}, (xs[t],)), ys[t])
            grads = torch.autograd.grad(l, list(phi.values()), create_graph=not first_order)
            phi = {k: v - lr * g for (k, v), g in zip(phi.items(), grads)}
        q = lossfn(functional_call(model, {**theta, **phi}, (xq[t],)), yq[t])
        if eta:
            q = q + eta * mlp_logdet(model, phi, xs[t], tau, method)
        total = total + q
    return total / xs.shape[0]


def _batchnorm_prefixes(model):
    return tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)) or ("\0",)


def tiny_mlp(hidden=5):
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def tiny_convnet(classes=3):
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, classes),
    )


def dense_kfac_precision(A, G, scale: float, tau: float, method: str):
    """The precision of a layer's K-FAC block as the dense d_A·d_G matrix per task, built with
    torch.kron (column-stacked vec of [W | b]): c·A⊗G + τI (``"exact"``), or the damped
    (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I) with π from the traces (``"factored"``). The
    independent oracle of the log-det ops and the posterior on small layers."""
    out = []
    for Ab, Gb in zip(A, G):
        dA, dG = Ab.shape[-1], Gb.shape[-1]
        eye_A, eye_G = torch.eye(dA, dtype=Ab.dtype), torch.eye(dG, dtype=Gb.dtype)
        if method == "exact":
            out.append(scale * torch.kron(Ab, Gb) + tau * torch.kron(eye_A, eye_G))
            continue
        trA, trG = torch.trace(Ab), torch.trace(Gb)
        pi = torch.sqrt((trA / dA) / (trG / dG)) if trA > 0 and trG > 0 else torch.ones((), dtype=Ab.dtype)
        s, t = scale**0.5, tau**0.5
        out.append(torch.kron(s * Ab + pi * t * eye_A, s * Gb + t / pi * eye_G))
    return torch.stack(out)


def digests(folder) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) and its sha256: what a command must leave as it was."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = Path(parent) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


FUZZ = Path(__file__).with_name("fuzz_ops.py")


def fuzz_failures(cases: int, *args: str) -> list[str]:
    """The FAIL lines of tests/fuzz_ops.py over `cases` cases (extra arguments passed on), run
    in a child process; a crash of the child is a failure too, and the run continues after
    the crashing case."""
    failures, start = [], 0
    while start < cases:
        run = subprocess.run([sys.executable, str(FUZZ), "--start", str(start), "--cases", str(cases), *args],
                             capture_output=True, text=True, timeout=900)
        failures += [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
        if run.returncode == 0 and f"DONE {cases}" in run.stdout:
            break
        started = [int(m) for m in re.findall(r"^CASE (\d+)$", run.stdout, re.M)]
        last = started[-1] if started else start
        failures.append(f"CRASH {last}: exit status {run.returncode}; {run.stderr.strip()[-300:]}")
        start = last + 1
    return failures


def dense_posterior_precision(layer):
    """The precision of a layer posterior's vec([W | b]) (column-stacked) per task, [tasks, D, D],
    built densely from its factorisation (the oracle of the posterior's tests)."""
    if layer.method == "factored":
        return torch.stack([torch.kron(LA @ LA.mT, LG @ LG.mT) for LA, LG in zip(layer.L_A, layer.L_G)])
    U = torch.stack([torch.kron(UA, UG) for UA, UG in zip(layer.U_A, layer.U_G)])  # vec(U_G E U_Aᵀ) = (U_A⊗U_G) vec E
    return U @ torch.diag_embed(layer.std.mT.flatten(1).pow(-2)) @ U.mT


def dense_posterior_covariance(layer):
    return torch.linalg.inv(dense_posterior_precision(layer))
