"""The training loop: resume equivalence, checkpoints, metrics, CLI and configuration errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastlaplace import train as train_mod
from fastlaplace.config import Config
from fastlaplace.evaluate import Estimate
from fastlaplace.problems import SinusoidProblem
from fastlaplace.runs import load_for_evaluation, read_checkpoint
from fastlaplace.train import train


def small_config(tmp_path, **overrides):
    values = dict(iterations=8, meta_batch=4, checkpoint_every=2, log_every=1, eval_tasks=20,
                  out=str(tmp_path / "run"), method="llama", eta=1e-3, tau=0.1)
    values.update(overrides)
    return Config(**values)


def final_parameters(out):
    return read_checkpoint(f"{out}/checkpoint.pt")["learner"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["llama", "maml"])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, method):
    straight = train(small_config(tmp_path / "a", method=method), progress=False)

    calls = {"n": 0}
    original = SinusoidProblem.sample

    def crashing_sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during iteration 6; the last checkpoint is at 4
            raise Crash()
        return original(self, *args, **kwargs)

    cfg = small_config(tmp_path / "b", method=method)
    monkeypatch.setattr(SinusoidProblem, "sample", crashing_sample)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    monkeypatch.setattr(SinusoidProblem, "sample", original)
    assert read_checkpoint(f"{cfg.out}/checkpoint.pt")["iteration"] == 4
    resumed = train(cfg, resume=True, progress=False)

    assert resumed["test"] == straight["test"]
    a, b = final_parameters(tmp_path / "a" / "run"), final_parameters(cfg.out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]
    assert [r["iteration"] for r in rows] == list(range(1, 9))  # lines after the checkpoint were not duplicated


def test_existing_run_needs_resume_flag(tmp_path):
    cfg = small_config(tmp_path, iterations=2)
    train(cfg, progress=False, evaluate_at_end=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    train(small_config(tmp_path, iterations=2), progress=False, evaluate_at_end=False)
    with pytest.raises(ValueError, match="other settings of meta_batch"):
        train(small_config(tmp_path, iterations=2, meta_batch=5), resume=True, progress=False)


def test_checkpoint_loads_for_evaluation(tmp_path):
    cfg = small_config(tmp_path, iterations=2)
    train(cfg, progress=False, evaluate_at_end=False)
    learner, problem, loaded = load_for_evaluation(f"{cfg.out}/checkpoint.pt")
    assert loaded.method == "llama" and type(learner).__name__ == "LLAMA"
    assert not list(tmp_path.glob("run/*.tmp"))  # atomic writes leave no temporary files


def test_nan_loss_is_reported(tmp_path):
    with pytest.raises(FloatingPointError, match="meta-loss became"):
        train(small_config(tmp_path, inner_lr=1e30, method="maml"), progress=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(meta_lr=-1.0), "--meta-lr"),
    (dict(iterations=0), "--iterations"),
    (dict(meta_batch=0), "--meta-batch"),
    (dict(method="reptile"), "method"),
    (dict(dataset="omniglot"), "data-root"),
    (dict(device="cuda:7"), "CUDA") if not torch.cuda.is_available() else (dict(tau=0.0), "tau"),
])
def test_bad_configuration(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(small_config(tmp_path, **overrides), progress=False)


def test_cli_train_and_evaluate(tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "-m", "fastlaplace.train", "--iterations", "4", "--meta-batch", "3", "--eval-tasks", "12",
         "--out", str(out), "--method", "fomaml"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "test mse after 1 inner step(s)" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"1", "10"}
    ev = subprocess.run([sys.executable, "-m", "fastlaplace.evaluate", str(out / "checkpoint.pt"), "--tasks", "12"],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    # Same tasks, same seed: the evaluation reproduces the run's own numbers.
    assert json.loads(ev.stdout.strip().splitlines()[-1])["1"]["mean"] == results["test"]["1"]["mean"]


def test_cli_reports_bad_options_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's messages
    run = subprocess.run([sys.executable, "-m", "fastlaplace.train", "--inner-lr", "-1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode != 0 and "error: --inner-lr must be a finite number > 0" in run.stderr
    assert "Traceback" not in run.stderr


def test_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"iterations": 3, "method": "maml"}))
    cfg, resume, _ = train_mod.parse_args(["--config", str(path), "--seed", "4"])
    assert (cfg.iterations, cfg.method, cfg.seed, resume) == (3, "maml", 4, False)


@pytest.mark.parametrize("module", ["evaluate", "uncertainty"])
def test_missing_checkpoint_is_a_clear_error(tmp_path, module):
    run = subprocess.run([sys.executable, "-m", f"fastlaplace.{module}", str(tmp_path / "none.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode != 0 and "no checkpoint at" in run.stderr and "Traceback" not in run.stderr


def test_miniimagenet_defaults_are_the_papers():
    """Section 5.2: Conv4 with 64 filters, 5 inner steps of α = 0.01, η = 1e-6, τ = 1e-3."""
    from fastlaplace.datasets import DATASETS
    d = DATASETS["miniimagenet"].settings()
    assert (d["filters"], d["inner_steps"], d["inner_lr"], d["eta"], d["tau"]) == (64, 5, 0.01, 1e-6, 1e-3)


def test_ctrl_c_stops_after_an_iteration_with_a_checkpoint(tmp_path):
    """SIGINT (Ctrl-C) ends the current iteration, saves, says how to continue; --resume does."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastlaplace.train", "--method", "maml", "--iterations", "100000", "--log-every", "5",
           "--out", str(out), "--no-progress"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    stopped = read_checkpoint(out / "checkpoint.pt")["iteration"]
    assert f"stopped at iteration {stopped}; checkpoint saved. Continue with --resume --out {out}" in err
    resumed = train_mod.main(["--resume", "--out", str(out), "--iterations", str(stopped + 2), "--eval-tasks", "4",
                              "--no-progress"])
    assert resumed["iterations"] == stopped + 2 and read_checkpoint(out / "checkpoint.pt")["iteration"] == stopped + 2


def test_tensorboard_gets_the_logged_rows_and_is_closed(tmp_path, monkeypatch):
    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (an optional dependency)
        def __init__(self):
            self.scalars, self.closed = [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def close(self):
            self.closed = True

    writer = Writer()
    monkeypatch.setattr(train_mod, "_tensorboard", lambda out: writer)
    train(small_config(tmp_path, iterations=3, log_every=2), progress=False, evaluate_at_end=False)
    assert writer.closed and {step for _, step in writer.scalars} == {2, 3}
    assert {tag for tag, _ in writer.scalars} == {"train/loss", "train/query_loss", "train/seconds", "train/logdet"}


def test_evaluation_in_groups_gives_the_same_results():
    """Adapting fewer tasks at once (where memory is short) changes nothing but the memory."""
    from fastlaplace import MAML, sinusoid_mlp
    from fastlaplace.data import SinusoidTasks
    from fastlaplace.evaluate import evaluate

    torch.manual_seed(0)
    learner, problem = MAML(sinusoid_mlp(), inner_lr=0.01), SinusoidProblem(SinusoidTasks())
    whole = evaluate(learner, problem, [0, 2], tasks=45, seed=3, chunk=20, progress=False)
    grouped = evaluate(learner, problem, [0, 2], tasks=45, seed=3, chunk=20, progress=False, group=6)
    for s in (0, 2):
        assert grouped[s].n == whole[s].n == 45
        assert grouped[s].mean == pytest.approx(whole[s].mean, rel=1e-6)
        assert grouped[s].ci95 == pytest.approx(whole[s].ci95, rel=1e-5)


def test_evaluation_group_shrinks_to_the_memory(monkeypatch):
    from fastlaplace import evaluate as evaluate_mod
    from fastlaplace.cli import UsageError

    cfg = Config(dataset="sinusoid").resolved()
    one = cfg.batch_memory(1, 0, graph=False)[1]
    monkeypatch.setattr(evaluate_mod, "available_memory", lambda device: 10**12)
    assert evaluate_mod.evaluation_group(cfg, 600, "--tasks", "cpu") == 100
    monkeypatch.setattr(evaluate_mod, "available_memory", lambda device: cfg.batch_memory(13, 0, graph=False)[1])
    assert 1 < evaluate_mod.evaluation_group(cfg, 600, "--tasks", "cpu") <= 13
    monkeypatch.setattr(evaluate_mod, "available_memory", lambda device: one - 1)
    monkeypatch.setattr("fastlaplace.cli.available_memory", lambda device: one - 1)
    with pytest.raises(UsageError, match="one task at a time"):
        evaluate_mod.evaluation_group(cfg, 600, "--tasks", "cpu")


def test_conv_strategy_is_recorded_and_may_change_on_resume(tmp_path):
    cfg = small_config(tmp_path, dataset="digits", method="maml", iterations=2, meta_batch=2, query=1, filters=4,
                       checkpoint_every=1, conv_strategy="loop", task_chunk=1)
    train(cfg, progress=False, evaluate_at_end=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task_chunk"] == 1
    recorded = json.loads((tmp_path / "run" / "conv_strategy.json").read_text())
    assert recorded["conv_strategy"] == "loop" and list(recorded["layers"]) == ["0", "4", "8", "12"]
    assert all(set(shapes.values()) == {"loop"} for shapes in recorded["layers"].values())
    resumed = small_config(tmp_path, dataset="digits", method="maml", iterations=3, meta_batch=2, query=1,
                           filters=4, checkpoint_every=1, conv_strategy="auto")
    train(resumed, resume=True, progress=False, evaluate_at_end=False)
    recorded = json.loads((tmp_path / "run" / "conv_strategy.json").read_text())
    assert recorded["conv_strategy"] == "auto" and list(recorded["layers"]) == ["0", "4", "8", "12"]


def test_estimate_counts_diverged_tasks_instead_of_averaging_them():
    values = torch.tensor([1.0, 2.0, float("inf"), 3.0, float("nan"), 4.0])
    est = Estimate.of(values)
    assert (est.n, est.diverged) == (6, 2)
    assert est.mean == pytest.approx(2.5) and est.median == pytest.approx(2.0)  # lower median of 1..4
    assert est.ci95 == pytest.approx(1.96 * float(torch.tensor([1.0, 2, 3, 4]).std()) / 2)
    assert "2 of 6 diverged" in str(est) and "4 finite tasks" in str(est)
    clean = Estimate.of(torch.tensor([1.0, 3.0]))
    assert clean.diverged == 0 and "diverged" not in str(clean) and "median 1.0000" in str(clean)
    gone = Estimate.of(torch.tensor([float("inf")] * 3))
    assert gone.diverged == 3 and math.isnan(gone.mean)


def _train_until_killed(cfg, monkeypatch, iteration: int) -> None:
    """Train ``cfg`` until it dies while sampling the meta-batch of ``iteration`` (as a kill would)."""
    original, calls = SinusoidProblem.sample, {"n": 0}

    def crashing_sample(self, split, *args, **kwargs):
        calls["n"] += split == "train"
        if calls["n"] == iteration:
            raise Crash()
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(SinusoidProblem, "sample", crashing_sample)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    monkeypatch.setattr(SinusoidProblem, "sample", original)


def _val_rows(out):
    return [r for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "val_mse" in r]


def test_validation_keeps_the_best_parameters_and_tests_them(tmp_path, monkeypatch):
    """--val-every: the initialisation and every N-th iteration are validated on the same
    tasks; best.pt holds the parameters of the lowest validation MSE (forced here to be
    iteration 4's), and results.json tests them beside the last."""
    from fastlaplace import evaluate as evaluate_mod

    forced = {0: 3.0, 2: 2.0, 4: 1.0, 6: 1.5, 8: 2.5}
    seen = []
    real = evaluate_mod.evaluate

    def fake_validation(learner, problem, steps, tasks, seed, split="test", **kw):
        if split != "val":
            return real(learner, problem, steps, tasks, seed, split=split, **kw)
        seen.append((tasks, seed))
        trainer_iteration = len(seen) - 1
        return {steps[0]: Estimate.of(torch.full((tasks,), forced[2 * trainer_iteration]))}

    monkeypatch.setattr(train_mod, "evaluate", fake_validation)
    snapshots = {}
    real_save = train_mod.Trainer.save

    def save(self, iteration):
        snapshots[iteration] = {k: v.clone() for k, v in self.learner.state_dict().items()}
        real_save(self, iteration)

    monkeypatch.setattr(train_mod.Trainer, "save", save)
    cfg = small_config(tmp_path, val_every=2, val_tasks=7)
    summary = train(cfg, progress=False)
    assert seen == [(7, cfg.val_seed)] * 5  # the same tasks each time: iterations 0, 2, 4, 6, 8
    rows = _val_rows(cfg.out)
    assert [(r["iteration"], r["val_mse"], r["best"]) for r in rows] == [
        (0, 3.0, True), (2, 2.0, True), (4, 1.0, True), (6, 1.5, False), (8, 2.5, False)]
    best = read_checkpoint(f"{cfg.out}/best.pt")
    assert best["iteration"] == 4 and best["validation"]["mean"] == 1.0 and best["validation"]["metric"] == "mse"
    for k, v in snapshots[4].items():
        assert torch.equal(best["learner"][k], v), k
    assert summary["best"]["iteration"] == 4 and summary["best"]["val_mse"] == 1.0
    learner, problem, saved = load_for_evaluation(f"{cfg.out}/best.pt")  # what python -m fastlaplace.evaluate reads
    want = real(learner, problem, saved.test_inner_steps, saved.eval_tasks, saved.eval_seed)
    assert summary["best"]["test"] == {str(s): vars(e) for s, e in want.items()}
    assert summary["best"]["test"] != summary["test"]  # iteration 4's parameters, not the last
    assert json.loads(Path(cfg.out, "results.json").read_text())["best"] == summary["best"]


def test_validation_resumes_with_the_best_so_far(tmp_path):
    """A resumed run keeps best.pt's figure as the one to beat and logs no validation twice;
    it ends with the uninterrupted run's best.pt and results."""
    straight = train(small_config(tmp_path / "a", val_every=2, val_tasks=5), progress=False)
    cfg = small_config(tmp_path / "b", val_every=2, val_tasks=5, iterations=5)
    train(cfg, progress=False, evaluate_at_end=False)
    cfg = small_config(tmp_path / "b", val_every=2, val_tasks=5)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed == straight
    assert [r["iteration"] for r in _val_rows(cfg.out)] == [0, 2, 4, 6, 8]
    a, b = read_checkpoint(tmp_path / "a" / "run" / "best.pt"), read_checkpoint(f"{cfg.out}/best.pt")
    assert a["iteration"] == b["iteration"] and a["validation"] == b["validation"]
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k


def test_a_new_run_does_not_inherit_a_stale_best(tmp_path):
    cfg = small_config(tmp_path, iterations=2, val_every=1, val_tasks=3)
    train(cfg, progress=False, evaluate_at_end=False)
    os.remove(f"{cfg.out}/checkpoint.pt")  # the one checkpoint (iteration 2): only best.pt and the logs stay
    assert Path(cfg.out, "best.pt").exists() and not Path(cfg.out, "checkpoint.prev.pt").exists()
    with pytest.raises(FileExistsError, match="best.pt"):
        train(small_config(tmp_path, iterations=2), progress=False)
    train(small_config(tmp_path, iterations=2, overwrite=True), progress=False, evaluate_at_end=False)
    assert not Path(cfg.out, "best.pt").exists() and not Path(cfg.out, "best.prev.pt").exists()


@pytest.mark.parametrize("flag, value, message", [("--val-every", "-1", "--val-every must be an integer >= 0"),
                                                  ("--val-tasks", "0", "--val-tasks must be an integer >= 1")])
def test_bad_validation_flags(tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        train_mod.main(["--iterations", "2", flag, value, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_run_killed_between_validation_and_checkpoint_validates_again(tmp_path, monkeypatch):
    """Killed after iteration 4's validation (and best.pt) but before its checkpoint: the
    resumed run validates iteration 4 again, and its lines and results equal an uninterrupted run's."""
    straight = train(small_config(tmp_path / "a", val_every=2, val_tasks=5), progress=False)
    real_save = train_mod.Trainer.save

    def dying_save(self, iteration):
        if iteration == 4:
            raise Crash()
        real_save(self, iteration)

    cfg = small_config(tmp_path / "b", val_every=2, val_tasks=5)
    monkeypatch.setattr(train_mod.Trainer, "save", dying_save)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    monkeypatch.setattr(train_mod.Trainer, "save", real_save)
    assert [r["iteration"] for r in _val_rows(cfg.out)] == [0, 2, 4]
    resumed = train(cfg, resume=True, progress=False)
    assert resumed == straight
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _val_rows(cfg.out)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _val_rows(tmp_path / "a" / "run")]


def test_a_stop_on_a_validation_iteration_is_validated_when_resumed(tmp_path, monkeypatch):
    """Ctrl-C at iteration 4 (a validation iteration) saves without validating it; the resumed
    run validates 4 first and ends as the uninterrupted one, lines included."""
    straight = train(small_config(tmp_path / "a", val_every=2, val_tasks=5), progress=False)
    real_step = train_mod.Trainer.step

    def stopping_step(self, iteration, stop):
        stop.stop = stop.stop or iteration == 4
        return real_step(self, iteration, stop)

    cfg = small_config(tmp_path / "b", val_every=2, val_tasks=5)
    monkeypatch.setattr(train_mod.Trainer, "step", stopping_step)
    assert train(cfg, progress=False) == {"stopped_at": 4}
    monkeypatch.setattr(train_mod.Trainer, "step", real_step)
    assert [r["iteration"] for r in _val_rows(cfg.out)] == [0, 2]
    assert train(cfg, resume=True, progress=False) == straight
    assert _val_rows(cfg.out) == _val_rows(tmp_path / "a" / "run")


def test_a_run_killed_before_its_first_checkpoint_starts_its_validations_afresh(tmp_path, monkeypatch):
    """No checkpoint yet: the resumed run starts at 0, the dead run's best files (past iteration
    0) are removed and its iteration-0 line is not doubled."""
    straight = train(small_config(tmp_path / "a", val_every=2, val_tasks=5, checkpoint_every=4), progress=False)
    cfg = small_config(tmp_path / "b", val_every=2, val_tasks=5, checkpoint_every=4)
    _train_until_killed(cfg, monkeypatch, 4)  # validated 0 and 2, no checkpoint
    assert not Path(cfg.out, "checkpoint.pt").exists() and Path(cfg.out, "best.pt").exists()
    assert train(cfg, resume=True, progress=False) == straight
    assert _val_rows(cfg.out) == _val_rows(tmp_path / "a" / "run")
    for name in ("best.pt", "best.prev.pt"):
        a, b = (Path(d, name) for d in (tmp_path / "a" / "run", cfg.out))
        assert a.exists() == b.exists(), name
        if a.exists():
            assert read_checkpoint(a)["iteration"] == read_checkpoint(b)["iteration"], name


def test_validations_with_diverged_tasks_rank_below_those_without(tmp_path, monkeypatch):
    """All tasks diverged (NaN figure): never best; some diverged: below any with fewer, even
    at a better mean over the finite tasks (MSE: lower is better)."""
    nan = math.nan
    figures = [[nan, nan, nan], [5.0, 5.0, 5.0], [1.0, 1.0, nan], [4.0, 4.0, 4.0], [4.5, 4.5, 4.5]]

    def fake_validation(learner, problem, steps, tasks, seed, split="test", **kw):
        return {steps[0]: Estimate.of(torch.tensor(figures.pop(0)))}

    monkeypatch.setattr(train_mod, "evaluate", fake_validation)
    cfg = small_config(tmp_path, iterations=8, val_every=2, val_tasks=3)
    train(cfg, progress=False, evaluate_at_end=False)
    assert [r["best"] for r in _val_rows(cfg.out)] == [False, True, False, True, False]
    assert read_checkpoint(f"{cfg.out}/best.pt")["iteration"] == 6


def _forced_validation(monkeypatch, figures: dict):
    """Validation figures (MSE) set per iteration: evaluate's "val" calls answer figures[iteration]."""
    real_validate, real_evaluate, current = train_mod.Trainer.validate, train_mod.evaluate, {}

    def validate(self, iteration, metrics):
        current["iteration"] = iteration
        return real_validate(self, iteration, metrics)

    def evaluate(learner, problem, steps, tasks, seed, split="test", **kw):
        if split != "val":
            return real_evaluate(learner, problem, steps, tasks, seed, split=split, **kw)
        return {steps[0]: Estimate.of(torch.full((tasks,), figures[current["iteration"]]))}

    monkeypatch.setattr(train_mod.Trainer, "validate", validate)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)


def _best_files(out):
    return {name: read_checkpoint(Path(out, name))["iteration"] if Path(out, name).exists() else None
            for name in ("best.pt", "best.prev.pt")}


@pytest.mark.parametrize("crash_at", [3, 7])
def test_two_improvements_after_a_checkpoint_then_a_kill_resume_to_the_same_best(tmp_path, monkeypatch, crash_at):
    """Checkpoints at 4 and 8, validation every iteration, improvements at 5 and 6, killed
    during iteration 7 (or before any checkpoint): best.prev.pt still holds the best as of the
    checkpoint, so the resumed run's lines, best files and results equal an uninterrupted run's."""
    _forced_validation(monkeypatch, {0: 5.0, 1: 6.0, 2: 6.0, 3: 6.0, 4: 7.0, 5: 4.0, 6: 3.0, 7: 8.0, 8: 9.0})
    straight = train(small_config(tmp_path / "a", val_every=1, val_tasks=3, checkpoint_every=4), progress=False)
    cfg = small_config(tmp_path / "b", val_every=1, val_tasks=3, checkpoint_every=4)
    _train_until_killed(cfg, monkeypatch, crash_at)
    assert train(cfg, resume=True, progress=False) == straight
    assert _val_rows(cfg.out) == _val_rows(tmp_path / "a" / "run")
    assert _best_files(cfg.out) == _best_files(tmp_path / "a" / "run") == {"best.pt": 6, "best.prev.pt": 0}


def test_resuming_with_other_validation_tasks_is_refused_before_anything_changes(tmp_path):
    cfg = small_config(tmp_path, iterations=4, val_every=2, val_tasks=3)
    train(cfg, progress=False, evaluate_at_end=False)
    before = {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()}
    with pytest.raises(ValueError, match=r"best.pt was validated with tasks 3 \(now 5\)"):
        train(small_config(tmp_path, iterations=6, val_every=2, val_tasks=5), resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()} == before
    train(small_config(tmp_path, iterations=6, val_every=0, val_tasks=5), resume=True, progress=False)  # no validation


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path):
    """The run folder is locked while a run trains into it (runs.lock_output, flock): the same
    command started again, or --resume while it runs, stops with an error and changes nothing."""
    from fastlaplace.runs import lock_output

    cfg = small_config(tmp_path, iterations=2)
    train(cfg, progress=False, evaluate_at_end=False)
    held = lock_output(Path(cfg.out))  # as the other process would hold it
    before = {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()}
    try:
        with pytest.raises(ValueError, match=f"another process is training into {cfg.out}"):
            train(small_config(tmp_path, iterations=4), resume=True, progress=False)
    finally:
        held.close()
    assert {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()} == before
    assert train(small_config(tmp_path, iterations=4), resume=True, progress=False)["iterations"] == 4  # released
