"""Bad command lines end in one ``error: ...`` line and a non-zero exit, never a traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import digests

from fastlaplace import cli, evaluate, plot, train, uncertainty
from fastlaplace.calibration import nll
from fastlaplace.cli import UsageError, check_output
from fastlaplace.config import Config
from fastlaplace.data import convert
from fastlaplace.prior import Prior
from fastlaplace.runs import checkpoint_inputs, load_for_evaluation, read_checkpoint, save_checkpoint

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


# ---------------------------------------------------------------------------- hostile command lines
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LLAMA sinusoid run at iteration 4 (its previous checkpoint at 2), a tiny digits LLAMA
    run, the sinusoid run's checkpoint with a NaN parameter (valid checksum), and a folder
    holding another run's files but no checkpoint."""
    d = tmp_path_factory.mktemp("hostile")
    train.main(["--iterations", "4", "--meta-batch", "2", "--checkpoint-every", "2", "--eval-tasks", "4",
                "--out", str(d / "run"), "--no-progress"])
    train.train(Config(dataset="digits", iterations=1, meta_batch=1, filters=2, test_inner_steps=[1], eval_tasks=2,
                       out=str(d / "digits")), progress=False, evaluate_at_end=False)
    state = read_checkpoint(d / "run" / "checkpoint.pt")
    next(iter(state["learner"].values())).view(-1)[0] = float("nan")
    (d / "nan").mkdir()
    save_checkpoint(d / "nan" / "checkpoint.pt", state)
    (d / "stale").mkdir()
    for name in ("results.json", "metrics.jsonl", "config.json"):
        (d / "stale" / name).write_bytes((d / "run" / name).read_bytes())
    return d


# Hostile command lines (tests/test_bad_command_lines.py has more), each run from the repository
# root on its own copy of the runs, all at once (starting Python and torch is most of their
# time): "program arguments", and what the error line says.
ISSUE_LINES = dict([
    ("uncertainty {d}/run/checkpoint.pt --json {d}/run/checkpoint.pt", "would overwrite an input"),
    ("train --resume --out {d}/run --iterations 1", "is at iteration 4, past --iterations 1"),
    ("train --out {d}/stale --iterations 1", "pass --overwrite"),
    ("train --support 2000000000 --out {d}/new", "--support must be at most"),
    ("train --meta-batch 1000000000 --out {d}/new", "--meta-batch must be at most"),
    ("uncertainty {d}/digits/checkpoint.pt --sampled-networks", "for regression runs"),
    ("evaluate {d}/nan/checkpoint.pt", "non-finite values"),
    ("evaluate {d}/run/checkpoint.pt --steps 100000000", "--steps must be at most"),
])


@pytest.fixture(scope="module")
def issue_lines(runs, tmp_path_factory):
    """line -> (exit status, stderr, the digests of its copy of the runs before and after)."""
    started = {}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for line in ISSUE_LINES:
        d = tmp_path_factory.mktemp("line") / "runs"
        shutil.copytree(runs, d, symlinks=True)
        before = digests(d)
        module, *args = line.format(d=d).split()
        process = subprocess.Popen([sys.executable, "-m", f"fastlaplace.{module}", *args],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[line] = (process, d, before)
    done = {}
    for line, (process, d, before) in started.items():
        _, err = process.communicate(timeout=300)
        done[line] = (process.returncode, err, before, digests(d))
    return done


@pytest.mark.parametrize("line", ISSUE_LINES)
def test_command_lines_of_issue_22_are_refused_and_change_nothing(issue_lines, line):
    code, err, before, after = issue_lines[line]
    assert code != 0, err
    assert_one_error_line(err)
    assert ISSUE_LINES[line] in err.splitlines()[-1], err
    assert after == before


def test_uncertainty_and_reliability_of_a_digits_run_from_the_repository_root(runs, tmp_path):
    """The classification report of an image run (its data set taken from the run) and the
    reliability diagram, as processes started from the repository root."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    checkpoint, report = str(runs / "digits" / "checkpoint.pt"), tmp_path / "report.json"
    png = tmp_path / "reliability.png"
    printed = []
    for args in (["uncertainty", checkpoint, "--tasks", "3", "--samples", "4", "--json", str(report)],
                 ["plot", "reliability", checkpoint, "--tasks", "3", "--samples", "4", "--out", str(png)]):
        run = subprocess.run([sys.executable, "-m", f"fastlaplace.{args[0]}", *args[1:]], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        printed.append(run.stdout)
    table = [line for line in printed[0].splitlines() if line.startswith("| ")]  # the summary, not the JSON
    assert table[0].startswith("| predictor | accuracy | NLL | Brier | ECE | MCE |") and len(table) == 5, printed[0]
    assert table[1].startswith("| LLAMA, posterior predictive (MC) | ") and "3 test episodes" in printed[0]
    out = json.loads(report.read_text())
    assert out["episodes"] == 3 and "15 equal-width" in out["calibration_bins"] and out["temperature"] > 0
    assert out["prior"] == "early_stopping_first_order"
    for predictor in ("llama_mc", "llama_probit", "maml_point", "maml_temperature"):
        for metric in ("accuracy", "nll", "brier", "ece", "mce", "auroc_entropy_unseen_classes",
                       "auroc_entropy_noise", "auroc_entropy_rotation"):
            value = out[predictor][metric]
            assert value["n"] == 3 and value["mean"] == value["mean"], (predictor, metric)
    assert png.stat().st_size > 10_000
    assert sum(out["llama_mc"]["reliability"]["count"]) == 3 * 5 * 5  # episodes × ways × queries
    # the query images are predicted on their own: the out-of-distribution sets do not enter
    # their BatchNorm statistics
    learner, problem, _ = load_for_evaluation(checkpoint, device="cpu")
    both, alone = (uncertainty.episode_probs(learner, learner, problem, "test", 2, 0, 2, "early_stopping_first_order",
                                             None, 1, ood=ood) for ood in (True, False))
    torch.testing.assert_close(both["point_logits"][:, :alone["y"].shape[1]], alone["point_logits"])
    # the validation sweep over τ shares one adaptation per episode and one set of random
    # draws: the NLL of a separate pass per candidate, over two groups of episodes
    sweep = Prior.validation([1.0, 1e4])
    chosen, nlls = uncertainty.choose_prior(learner, problem, sweep, 12, 5, 3, None, 1)
    for candidate in sweep.candidates():
        alone = uncertainty.episode_probs(learner, learner, problem, "val", 12, 5, 3, candidate, None, 1, ood=False)
        assert nlls[str(candidate)] == float(nll(alone["mc"], alone["y"]).mean())
    assert nlls[str(chosen)] == min(nlls.values()) and len(set(nlls.values())) == 2
    plot.main(["reliability", "--report", str(report), "--out", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not a report"):
        plot.main(["reliability", "--report", str(runs / "run" / "config.json"), "--out", str(tmp_path / "x.png")])


def test_size_beyond_memory_is_refused_before_allocating(runs, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--support", "1000000", "--meta-batch", "1000", "--out", str(runs / "new")])
    assert ("one meta-batch of --meta-batch 1000 (1000 in this process) tasks of --support 1000000 + --query-points "
            "10 points and --inner-steps 1 needs at least") in exc.value.code
    assert_one_error_line(capsys.readouterr().err + exc.value.code)
    assert not (runs / "new").exists()


@pytest.mark.parametrize("program, args", [
    ("uncertainty", ["{d}/nan/checkpoint.pt"]), ("plot", ["posterior", "{d}/nan/checkpoint.pt", "--out", "{d}/p.png"]),
    ("train", ["--resume", "--out", "{d}/nan", "--iterations", "8"])])
def test_non_finite_checkpoint_is_refused_by_every_program(runs, capsys, program, args):
    before = digests(runs)
    with pytest.raises(SystemExit) as exc:
        MAINS[program]([a.format(d=runs) for a in args])
    assert "non-finite values" in str(exc.value.code)
    assert_one_error_line(capsys.readouterr().err + exc.value.code)
    assert digests(runs) == before


def test_overwrite_replaces_another_runs_files(runs, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "tensorboard").mkdir()
    old_events = out / "tensorboard" / "events.out.tfevents.1.old"
    old_events.write_bytes(b"another run's curves")
    with pytest.raises(SystemExit, match="TensorBoard events"):  # events alone are another run's files
        train.main(["--out", str(out), "--iterations", "1", "--no-progress"])
    for name in ("results.json", "metrics.jsonl", "config.json"):
        (out / name).write_bytes((runs / "run" / name).read_bytes())
    results = train.main(["--out", str(out), "--overwrite", "--method", "maml", "--iterations", "1", "--eval-tasks",
                          "2", "--no-progress"])
    assert results["method"] == "maml" and json.loads((out / "results.json").read_text())["method"] == "maml"
    assert [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")] == [1]
    assert not old_events.exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["overwrite"] is True and saved["method"] == "maml"
    # --overwrite is not a setting of the problem: resuming without it is allowed
    assert train.main(["--resume", "--out", str(out), "--iterations", "2", "--eval-tasks", "2",
                       "--no-progress"])["iterations"] == 2


def test_resume_of_a_finished_run_keeps_its_checkpoints(runs, tmp_path):
    """--iterations equal to those done: nothing to train, the checkpoints are not rotated."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "config.json", "metrics.jsonl", "results.json"):
        (out / name).write_bytes((runs / "run" / name).read_bytes())
    before = digests(out)
    train.main(["--resume", "--out", str(out), "--no-progress"])
    after = digests(out)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert after[name] == before[name]


def test_outputs_are_compared_after_resolving_links_and_relative_paths(runs, tmp_path, monkeypatch):
    (tmp_path / "link").symlink_to(runs / "run")
    monkeypatch.chdir(runs)
    for path in (tmp_path / "link" / "config.json", "run/../run/metrics.jsonl", "./run/checkpoint.prev.pt"):
        with pytest.raises(UsageError, match="would overwrite an input"):
            check_output("--json", str(path), checkpoint_inputs("run/checkpoint.pt"))
    check_output("--json", str(runs / "run" / "report.json"), checkpoint_inputs("run/checkpoint.pt"))


def test_memory_estimate_names_the_flags(monkeypatch):
    cfg = Config(meta_batch=1000).resolved()
    what, needed = cfg.batch_memory(1000, 1)
    assert "--support 10 + --query-points 10" in what and needed > 1000 * 20 * 4
    monkeypatch.setattr(cli, "available_memory", lambda device: needed - 1)
    with pytest.raises(UsageError, match="needs at least .* GiB, more than"):
        cli.check_memory(what, needed, "cpu")
    assert cli.available_memory("cpu") > 2**20


def test_calibration_honours_tasks_and_samples(runs, monkeypatch):
    seen = {}

    def calibrate(*args, tasks, samples, **kwargs):
        seen.update(tasks=tasks, samples=samples)
        raise SystemExit("error: stop here")

    monkeypatch.setattr(uncertainty, "calibrate", calibrate)
    with pytest.raises(SystemExit):
        uncertainty.main([str(runs / "run" / "checkpoint.pt"), "--tasks", "3", "--samples", "4"])
    assert seen == {"tasks": 3, "samples": 4}
    with pytest.raises(SystemExit):
        uncertainty.main([str(runs / "run" / "checkpoint.pt")])
    assert seen == {"tasks": uncertainty.CALIBRATION_TASKS, "samples": uncertainty.CALIBRATION_SAMPLES}


def test_uncertainty_prints_the_whole_report_with_json_dash(runs, capsys):
    result = uncertainty.main([str(runs / "digits" / "checkpoint.pt"), "--tasks", "2", "--samples", "2",
                               "--json", "-"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))


def test_uncertainty_of_a_regression_run_prints_its_figures(runs, capsys):
    uncertainty.main([str(runs / "run" / "checkpoint.pt"), "--tasks", "3", "--samples", "4"])
    out = capsys.readouterr().out
    for figure in ("predictive NLL, LLAMA", "predictive NLL, MAML point", "coverage of the 50 % interval",
                   "coverage of the 90 % interval", "sd away from the data / sd near it"):
        assert f"| {figure} | " in out, out
    assert out.startswith("prior: ") and "{" not in out


def test_uncertainty_records_each_candidate_prior_on_validation(runs, capsys):
    result = uncertainty.main([str(runs / "digits" / "checkpoint.pt"), "--tasks", "2", "--samples", "2",
                               "--prior", "validation", "--taus", "10", "1e6", "--json", "-"])
    scores = result["validation_nll"]
    assert sorted(scores) == ["tau=10", "tau=1e+06"] and all(v == v for v in scores.values())
    assert result["prior"] == f"scalar tau chosen on validation episodes ({min(scores, key=scores.get)})"
