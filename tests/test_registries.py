"""Data sets, methods, networks and layer kinds are tables that everything asks: no module of
the package outside the registries compares a run's settings with one of their names; a data
set of a new task family and a new method, registered from outside the package
(tests/toy_registrations.py), run end to end from the command line; and a new layer kind
(nn.Conv1d) is one row of batched.LAYER_KINDS."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlaplace import LLAMA, batched
from fastlaplace.batched import LayerKind
from fastlaplace.datasets import DATASETS
from fastlaplace.methods import METHODS
from fastlaplace.models import MODELS
from fastlaplace.options import Registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastlaplace"
REGISTRIES = {PACKAGE / "datasets.py", PACKAGE / "methods.py", PACKAGE / "models.py"}  # where the names live
NAMES = {*DATASETS, *METHODS, *MODELS}


def switches(source: str, names: set[str]) -> list[int]:
    """Lines that compare with a registered name: ``== "sinusoid"``, ``!= "llama"``,
    ``in ("omniglot", "miniimagenet")``, ``case "mlp":``."""
    def named(node) -> bool:
        elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(e, ast.Constant) and e.value in names for e in elements)

    compared = []  # (line, operand)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            compared += [(node.lineno, n) for n in (node.left, *node.comparators)]
        elif isinstance(node, ast.MatchValue):
            compared.append((node.lineno, node.value))
    return sorted({line for line, operand in compared if named(operand)})


def test_no_string_switch_on_a_registered_name():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PACKAGE.rglob("*.py")) if path not in REGISTRIES
             for line in switches(path.read_text(), NAMES)]
    assert not found, f"compared with a data set, method or model name (ask the registry instead): {found}"


def test_the_switch_finder_finds_switches():
    source = ('if cfg.dataset == "sinusoid": pass\nif "llama" != m: pass\nok = cfg.x in ("a", "b")\n'
              'if d in ("omniglot", "digits"): pass\nmatch m:\n    case "mlp": pass\n')
    assert switches(source, {"sinusoid", "llama", "omniglot", "mlp"}) == [1, 2, 4, 6]


def test_a_registry_names_its_choices():
    things = Registry("thing")
    things.register("one", 1)
    things.register("two", 2)
    assert (list(things), len(things), things["two"], "one" in things, ["x"] in things) == (["one", "two"], 2, 2,
                                                                                          True, False)
    with pytest.raises(ValueError, match=r"thing must be one of \('one', 'two'\), got 'three'"):
        things["three"]
    with pytest.raises(ValueError, match="thing 'one' is already registered"):
        things.register("one", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        things.register("", 3)


def test_the_registries_hold_the_programs_choices():
    assert list(DATASETS) == ["sinusoid", "digits", "omniglot", "miniimagenet"]
    assert list(METHODS) == ["maml", "fomaml", "llama"]
    assert list(MODELS) == ["mlp", "conv4", "resnet12"]
    for name, spec in DATASETS.items():
        assert set(spec.models) <= set(MODELS), name
        assert spec.loss is spec.family.loss


def test_a_spec_whose_problem_is_not_of_its_family_is_refused(monkeypatch):
    """The learner's loss is the problem's: a spec that declares one family and builds another is an error."""
    from dataclasses import replace

    from fastlaplace import runs
    from fastlaplace.config import Config
    from fastlaplace.problems import ImageProblem

    datasets = Registry("dataset")
    datasets.register("sinusoid", replace(DATASETS["sinusoid"], family=ImageProblem))
    monkeypatch.setattr(runs, "DATASETS", datasets)
    with pytest.raises(TypeError, match="built a SinusoidProblem, but its DatasetSpec's family is ImageProblem"):
        runs.make_problem(Config().resolved())


def run(module: str, *args: str, registrations: bool = True, then: str = "") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root, after importing the toy
    registrations, followed by the Python code ``then``."""
    code = f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True); {then}"
    if registrations:
        code = "import toy_registrations; " + code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_new_data_set_and_method_train_from_the_command_line(tmp_path):
    out, checkpoint = tmp_path / "run", str(tmp_path / "run" / "checkpoint.pt")
    train = run("fastlaplace.train", "--dataset", "lines", "--method", "anil", "--iterations", "6",
                "--eval-tasks", "8", "--log-every", "2", "--out", str(out), "--no-progress")
    assert train.returncode == 0, train.stderr
    assert "test mse after 1 inner step(s)" in train.stdout
    results = json.loads((out / "results.json").read_text())
    assert (results["dataset"], results["method"], results["metric"]) == ("lines", "anil", "mse")
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"], saved["iterations"], saved["test_inner_steps"]) == ("mlp", 6, [0, 1])  # its defaults
    # Evaluated by the program; the learner took its loss from the problem (mean squared
    # error), not from the data set's name.
    evaluate = run("fastlaplace.evaluate", checkpoint, "--tasks", "4",
                   then="from fastlaplace.runs import load_for_evaluation; "
                        f"learner, problem, _ = load_for_evaluation({checkpoint!r}); "
                        "print(type(problem).__name__, learner.loss, learner.net.adapted_layers)")
    assert evaluate.returncode == 0 and "Traceback" not in evaluate.stderr, evaluate.stderr
    assert "test mse after 1 step(s)" in evaluate.stdout
    assert evaluate.stdout.split()[-3:] == ["LinesProblem", "mse", "['4']"]
    # Without its registration a program says what is missing.
    unknown = run("fastlaplace.evaluate", checkpoint, registrations=False)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "dataset 'lines', which is not registered here" in unknown.stderr


# ---------------------------------------------------------------------------- a new layer kind
def conv1d(call, name, module, x):
    """The stand-in of an nn.Conv1d (zero padding): rows [N·T, C, L], example-major, with
    per-task weights [T, C_out, C, k]; its K-FAC rows are its unfolded patches."""
    from fastlaplace.batched import LayerRecord, param_key

    T, N = call.tasks, call.examples
    call.called.add(name)
    w, b = call.params[param_key(name, "weight")], call.params.get(param_key(name, "bias"))
    patches = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), (1, module.dilation[0]), (0, module.padding[0]),
                       (1, module.stride[0]))  # [N·T, C·k, L']
    a = patches.reshape(N, T, *patches.shape[1:]).permute(1, 0, 3, 2).reshape(T, -1, patches.shape[1])
    s = a @ w.flatten(2).mT if b is None else torch.baddbmm(b.unsqueeze(1), a, w.flatten(2).mT)  # [T, N·L', C_out]
    if call.record:
        call.records.append(LayerRecord(name, a, s, b is not None, CONV1D, T))
    return s.reshape(T, N, -1, s.shape[-1]).permute(1, 0, 3, 2).reshape(N * T, s.shape[-1], -1)


CONV1D = LayerKind(nn.Conv1d, conv1d, lambda grad_s, tasks: grad_s, example_major=True,
                   own=("forward", "_conv_forward"))


class Signal(nn.Module):
    """A convolution over a signal [N, 1, 6] and a linear head; ``as_2d`` runs the same
    convolution as an nn.Conv2d with a 1×3 kernel on [N, 1, 1, 6] (the oracle)."""

    def __init__(self, as_2d: bool = False):
        super().__init__()
        self.as_2d = as_2d
        self.conv = nn.Conv2d(1, 3, (1, 3), padding=(0, 1)) if as_2d else nn.Conv1d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.unsqueeze(2) if self.as_2d else x)).flatten(1))


def test_a_new_layer_kind_is_one_row_of_the_table(monkeypatch):
    """nn.Conv1d, adapted per task once its row is in batched.LAYER_KINDS: the inner loop,
    log det Ĥ and the meta-gradient equal those of the same convolution as an nn.Conv2d."""
    torch.manual_seed(0)
    one_d = Signal().double()
    two_d = Signal(as_2d=True).double()
    with torch.no_grad():
        two_d.conv.weight.copy_(one_d.conv.weight.unsqueeze(2))
        two_d.conv.bias.copy_(one_d.conv.bias)
        two_d.head.load_state_dict(one_d.head.state_dict())
    xs, xq = torch.randn(2, 3, 4, 1, 6, dtype=torch.float64)
    ys, yq = torch.randn(2, 3, 4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(Conv1d\), which neither is nor contains an nn.Linear or nn.Conv2d"):
        LLAMA(one_d, adapt=["conv"])
    monkeypatch.setattr(batched, "LAYER_KINDS", (*batched.LAYER_KINDS, CONV1D))
    results = []
    for model in (one_d, two_d):
        learner = LLAMA(model, inner_lr=0.1, inner_steps=2, tau=0.5, eta=0.1)
        assert learner.net.adapted_layers == ["conv", "head"]
        parts = learner.meta_objective(xs, ys, xq, yq)
        parts.loss.backward()
        results.append((parts.query_loss, parts.logdet, model.conv.weight.grad.flatten(), model.head.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
