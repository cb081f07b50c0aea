"""Bad command lines end in one ``error: ...`` line and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlaplace import evaluate, plot, train, uncertainty
from fastlaplace.config import Config
from fastlaplace.data import convert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A LLAMA and a MAML sinusoid run, and assorted bad inputs."""
    d = tmp_path_factory.mktemp("cli")
    for method in ("llama", "maml"):
        train.train(Config(method=method, iterations=2, meta_batch=2, eval_tasks=4, out=str(d / method)),
                    progress=False, evaluate_at_end=False)
    (d / "bad.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "types.json").write_text(json.dumps({"iterations": "ten"}))
    (d / "bool.json").write_text(json.dumps({"meta_batch": True}))
    (d / "unknown.json").write_text(json.dumps({"learning_rate": 0.1}))
    (d / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "text.pt").write_text("not a checkpoint")
    (d / "empty").mkdir()
    (d / "partial").mkdir()
    (d / "partial" / "metrics.jsonl").write_text('{"iteration": 1, "lo')
    (d / "mini").mkdir()
    for name in ("train", "validation", "test"):
        (d / "mini" / f"mini-imagenet-cache-{name}.pkl").write_bytes(b"\x80\x04N.")
    return d


BAD = {
    "train": [
        "--device banana", "--device cuda:7", "--device 3", "--filters 0 --dataset digits", "--ways 1 --dataset digits",
        "--shots 0 --dataset digits", "--query -2 --dataset digits", "--iterations 0", "--meta-batch -1",
        "--meta-lr nan", "--meta-lr -1", "--inner-lr inf", "--tau -1", "--tau 0", "--eta -1", "--eta nan",
        "--test-inner-steps -1", "--eval-tasks 0", "--checkpoint-every 0", "--log-every 0", "--support 0",
        "--query-points 0", "--x-range 5 1", "--x-range 0 inf", "--dataset omniglot",
        "--dataset omniglot --data-root {d}/nowhere", "--dataset miniimagenet --data-root {d}/empty",
        "--dataset miniimagenet --data-root {d}/mini", "--dataset miniimagenet --data-root {d}/mini --allow-pickle",
        "--config {d}/missing.json", "--config {d}/bad.json", "--config {d}/list.json", "--config {d}/types.json",
        "--config {d}/bool.json", "--config {d}/unknown.json", "--config {d}/binary.json", "--config {d}/empty",
        "--seed 99999999999999999999999", "--iterations ten", "--dataset imagenet", "--method reptile", "--bogus",
        "--out {d}/llama",
        "--resume --out {d}/llama --tau 0.5", "--resume --out {d}/llama --method fomaml",
    ],
    "evaluate": [
        "{d}/none.pt", "{d}/text.pt", "{d}/empty", "{d}/llama/config.json", "{d}/llama/checkpoint.pt --tasks 0",
        "{d}/llama/checkpoint.pt --tasks -5", "{d}/llama/checkpoint.pt --split bogus",
        "{d}/llama/checkpoint.pt --steps -1", "{d}/llama/checkpoint.pt --device banana",
        "{d}/llama/checkpoint.pt --device cuda:3", "", "{d}/llama/checkpoint.pt --tasks x",
        "{d}/llama/checkpoint.pt --seed 99999999999999999999999",
    ],
    "uncertainty": [
        "{d}/none.pt", "{d}/text.pt", "{d}/maml/checkpoint.pt", "{d}/llama/checkpoint.pt --samples 0",
        "{d}/llama/checkpoint.pt --samples 1", "{d}/llama/checkpoint.pt --tasks 0",
        "{d}/llama/checkpoint.pt --maml {d}/none.pt", "{d}/llama/checkpoint.pt --maml {d}/text.pt",
        "{d}/llama/checkpoint.pt --method bogus", "{d}/llama/checkpoint.pt --json {d}/nowhere/report.json",
        "{d}/llama/checkpoint.pt --json {d}/empty", "{d}/llama/checkpoint.pt --prior bogus",
        "{d}/llama/checkpoint.pt --tau 0", "{d}/llama/checkpoint.pt --tau nan",
        "{d}/llama/checkpoint.pt --prior early_stopping --method factored",
    ],
    "plot": [
        "", "bogus", "posterior {d}/none.pt", "posterior {d}/text.pt", "posterior {d}/llama/checkpoint.pt --tau -1",
        "posterior {d}/llama/checkpoint.pt --tau nan", "posterior {d}/llama/checkpoint.pt --tau 0",
        "posterior {d}/llama/checkpoint.pt --steps -1",
        "posterior {d}/llama/checkpoint.pt --seed -99999999999999999999", "posterior {d}/maml/checkpoint.pt --tau 1",
        "posterior {d}/llama/checkpoint.pt --tau 1 --maml {d}/none.pt", "curves {d}/empty", "curves {d}/nowhere",
        "curves {d}/partial", "curves {d}/llama --out {d}/nowhere/curves.png", "curves {d}/llama --out {d}/empty",
    ],
    "convert": ["{d}/nowhere", "{d}/empty", "{d}/mini", ""],
}
MAINS = {"train": train.main, "evaluate": evaluate.main, "uncertainty": uncertainty.main, "plot": plot.main,
         "convert": convert.main}


def assert_one_error_line(text: str) -> None:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    assert text.strip().splitlines()[-1] == errors[0], text


@pytest.mark.parametrize("program, line", [(p, line) for p, lines in BAD.items() for line in lines])
def test_bad_command_line(files, capsys, program, line):
    argv = line.format(d=files).split()
    with pytest.raises(SystemExit) as exc:
        MAINS[program](argv)
    code = exc.value.code
    assert code not in (0, None)
    text = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert_one_error_line(text)


def run_module(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


class Payload:
    """Unpickling this creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_checkpoint_in_a_real_process(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"config": {}, "iteration": 1, "learner": Payload(marker)}, tmp_path / "evil.pt")
    run = run_module("fastlaplace.evaluate", tmp_path / "evil.pt", cwd=tmp_path)
    assert run.returncode != 0 and "could run code" in run.stderr
    assert_one_error_line(run.stderr)
    assert not marker.exists()


def test_bad_device_in_a_real_process(tmp_path):
    run = run_module("fastlaplace.train", "--device", "banana", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode != 0 and "device must be cpu, cuda or cuda:N" in run.stderr
    assert_one_error_line(run.stderr)
