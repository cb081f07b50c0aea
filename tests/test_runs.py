"""Checkpoints and resumption under damage: malicious, corrupted and truncated files, a
diverging run, a full disk, a crash before the first checkpoint, changed settings."""

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from fastlaplace import train as train_mod
from fastlaplace.config import Config
from fastlaplace.meta import MAML
from fastlaplace.problems import SinusoidProblem
from fastlaplace.runs import CheckpointError, load_for_evaluation, previous, read_checkpoint, save_checkpoint
from fastlaplace.train import train


def small_config(tmp_path, **overrides):
    values = dict(iterations=8, meta_batch=3, checkpoint_every=2, log_every=1, eval_tasks=10,
                  out=str(tmp_path / "run"), method="maml")
    values.update(overrides)
    return Config(**values)


class Crash(Exception):
    pass


def crash_at(monkeypatch, call):
    """SinusoidProblem.sample raises on its ``call``-th call (during that iteration)."""
    calls = {"n": 0}
    original = SinusoidProblem.sample

    def sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SinusoidProblem, "sample", sample)
    return lambda: monkeypatch.setattr(SinusoidProblem, "sample", original)


class Payload:
    """Unpickling this creates ``path``: the code a malicious checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def metrics_iterations(out):
    return [json.loads(line)["iteration"] for line in open(f"{out}/metrics.jsonl")]


@pytest.fixture
def run(tmp_path):
    cfg = small_config(tmp_path, iterations=4)
    train(cfg, progress=False, evaluate_at_end=False)
    return cfg


@pytest.mark.parametrize("wrapped", [False, True])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, wrapped):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    state = {"config": {}, "iteration": 1, "learner": {"w": Payload(marker)}}
    if wrapped:  # a well-formed outer layer with a matching digest around the payload
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        state = {"format": 1, "sha256": hashlib.sha256(data).hexdigest(),
                 "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refused because loading them could run code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_for_evaluation(str(path))
    assert not marker.exists()


def test_flipped_byte_is_detected(run):
    path = f"{run.out}/checkpoint.pt"
    raw = bytearray(open(path, "rb").read())
    read_checkpoint(path)  # intact before
    inner = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    at = raw.find(inner[len(inner) // 2: len(inner) // 2 + 64])
    assert at > 0
    raw[at + 5] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"corrupted \(checksum mismatch\); the previous checkpoint is .*prev"):
        read_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.999])
def test_truncated_or_damaged_file_is_a_clear_error(run, fraction):
    path = f"{run.out}/checkpoint.pt"
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError, match="corrupted"):
        read_checkpoint(path)


def test_resume_falls_back_to_the_previous_checkpoint(run, capsys):
    path = f"{run.out}/checkpoint.pt"
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    capsys.readouterr()
    train(small_config(Path(run.out).parent, iterations=6), resume=True, progress=False, evaluate_at_end=False)
    err = capsys.readouterr().err
    assert "corrupted" in err and "continuing from" in err and "at iteration 2" in err
    assert read_checkpoint(path)["iteration"] == 6 and read_checkpoint(previous(Path(path)))["iteration"] == 4
    assert Path(f"{path}.corrupt").exists()  # the damaged file is kept aside, out of the rotation
    assert metrics_iterations(run.out) == list(range(1, 7))


def nan_gradient_at(monkeypatch, iteration):
    """The meta-loss stays finite but its gradient is NaN at ``iteration``."""
    original = MAML.meta_objective
    calls = {"n": 0}

    def meta_objective(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == iteration:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            parts.loss = parts.loss + 0.0 * torch.sqrt(zero)  # value + 0, gradient 0·∞ = NaN
        return parts

    monkeypatch.setattr(MAML, "meta_objective", meta_objective)


def test_non_finite_gradient_keeps_the_good_checkpoint_and_resume_with_smaller_lr(tmp_path, monkeypatch, capsys):
    cfg = small_config(tmp_path)
    nan_gradient_at(monkeypatch, 4)  # a checkpoint iteration
    with pytest.raises(FloatingPointError, match=r"iteration 4; the last good checkpoint is .*checkpoint.pt "
                                                 r"\(iteration 2\).*--resume --out .* --meta-lr 0.0001"):
        train(cfg, progress=False)
    state = read_checkpoint(f"{cfg.out}/checkpoint.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["learner"].values())
    monkeypatch.undo()
    train_mod.main(["--resume", "--out", cfg.out, "--meta-lr", "1e-4", "--no-progress"])
    err = capsys.readouterr().err
    assert "resumed from" in err and "meta_lr changed from 0.001 to 0.0001" in err
    assert read_checkpoint(f"{cfg.out}/checkpoint.pt")["config"]["meta_lr"] == 1e-4
    assert metrics_iterations(cfg.out) == list(range(1, 9))


def test_non_finite_parameters_are_not_saved(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    original, calls = torch.optim.Adam.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(FloatingPointError, match="parameters or the optimiser state became non-finite"):
        train(cfg, progress=False)
    assert read_checkpoint(f"{cfg.out}/checkpoint.pt")["iteration"] == 2


def test_partial_metrics_line_and_crash_before_first_checkpoint(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, checkpoint_every=100)
    restore = crash_at(monkeypatch, 4)  # iterations 1-3 logged, no checkpoint yet
    with pytest.raises(Crash):
        train(cfg, progress=False)
    restore()
    with open(f"{cfg.out}/metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')  # cut short by the kill
    train(cfg, resume=True, progress=False, evaluate_at_end=False)
    assert metrics_iterations(cfg.out) == list(range(1, 9))


def test_partial_metrics_line_after_a_checkpoint(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    restore = crash_at(monkeypatch, 6)
    with pytest.raises(Crash):
        train(cfg, progress=False)
    restore()
    with open(f"{cfg.out}/metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')
    train(cfg, resume=True, progress=False, evaluate_at_end=False)
    assert metrics_iterations(cfg.out) == list(range(1, 9))


def test_disk_full_leaves_no_temporary_files_and_keeps_the_checkpoint(run, monkeypatch, capsys):
    original = torch.save

    def full(obj, f, *args, **kwargs):
        if not isinstance(f, io.BytesIO):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr("fastlaplace.runs.torch.save", full)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--resume", "--out", run.out, "--iterations", "6", "--no-progress"])
    assert str(exc.value.code).splitlines()[-1].startswith("error: could not write ")
    assert "No space left on device" in str(exc.value.code)
    out = Path(run.out)
    assert not [p.name for p in out.iterdir() if p.suffix in (".tmp", ".new") or p.name.endswith((".tmp", ".new"))]
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 4


def test_save_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "c.pt"
    for i in (1, 2, 3):
        save_checkpoint(path, {"config": {}, "iteration": i, "learner": {}})
    assert read_checkpoint(path)["iteration"] == 3 and read_checkpoint(previous(path))["iteration"] == 2


def test_resume_may_change_learning_rates_but_not_the_problem(run, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--resume", "--out", run.out, "--tau", "0.5", "--inner-steps", "3", "--no-progress"])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "inner_steps" in message and "tau" in message
    train_mod.main(["--resume", "--out", run.out, "--inner-lr", "0.005", "--iterations", "5", "--eval-tasks", "4",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert "inner_lr changed from 0.01 to 0.005" in err and "iterations changed from 4 to 5" in err


def test_image_checkpoint_needs_the_user_to_name_its_data_root(run, tmp_path):
    state = read_checkpoint(f"{run.out}/checkpoint.pt")
    state["config"].update(dataset="omniglot", data_root=str(tmp_path / "elsewhere"), ways=5, shots=1, query=1,
                           filters=8)
    save_checkpoint(tmp_path / "image.pt", state)
    with pytest.raises(ValueError, match="pass --data-root"):
        load_for_evaluation(str(tmp_path / "image.pt"))


def test_checkpoint_of_an_unavailable_device_says_how_to_evaluate_it(run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    state = read_checkpoint(f"{run.out}/checkpoint.pt")
    state["config"]["device"] = "cuda"
    save_checkpoint(tmp_path / "gpu.pt", state)
    with pytest.raises(ValueError, match="pass --device cpu"):
        load_for_evaluation(str(tmp_path / "gpu.pt"))
    assert load_for_evaluation(str(tmp_path / "gpu.pt"), device="cpu")[2].device == "cpu"


def test_plot_posterior_of_an_image_checkpoint(run, tmp_path):
    from fastlaplace import plot

    state = read_checkpoint(f"{run.out}/checkpoint.pt")
    state["config"].update(dataset="digits", ways=5, shots=1, query=1, filters=8)
    save_checkpoint(tmp_path / "image.pt", state)
    with pytest.raises(SystemExit, match="error: .*needs a LLAMA sinusoid checkpoint"):
        plot.main(["posterior", str(tmp_path / "image.pt"), "--tau", "1"])


def test_resume_takes_no_paths_from_the_saved_settings(tmp_path):
    run_dir = tmp_path / "copied-run"
    run_dir.mkdir()
    saved = dict(dataset="omniglot", method="maml", data_root="/somewhere/else", allow_pickle=True,
                 out="/somewhere/else/run", meta_batch=7)
    (run_dir / "config.json").write_text(json.dumps(saved))
    cfg, resume, _ = train_mod.parse_args(["--resume", "--out", str(run_dir)])
    assert resume and (cfg.dataset, cfg.method, cfg.meta_batch) == ("omniglot", "maml", 7)
    assert cfg.data_root is None and cfg.allow_pickle is False and cfg.out == str(run_dir)
    with pytest.raises(ValueError, match="--data-root is required"):
        cfg.resolved()


@pytest.mark.parametrize("damage", ["shape", "type", "optimizer", "generator", "config"])
def test_well_formed_checkpoint_of_another_model_is_a_clear_error(run, tmp_path, damage):
    state = read_checkpoint(f"{run.out}/checkpoint.pt")
    key = next(iter(state["learner"]))
    if damage == "shape":
        state["learner"][key] = torch.zeros(3)
    elif damage == "type":
        state["learner"][key] = 5
    elif damage == "optimizer":
        state["optimizer"] = 5
    elif damage == "generator":
        state["task_generator"] = torch.zeros(3)
    else:
        state["config"]["iterations"] = "x"
    save_checkpoint(Path(run.out) / "checkpoint.pt", state)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--resume", "--out", run.out, "--no-progress"])
    assert str(exc.value.code).startswith("error: ") and "\n" not in str(exc.value.code)


def test_atomic_write_never_writes_through_a_planted_link(tmp_path):
    from fastlaplace.data.images import ImageClasses, write_cache
    from fastlaplace.files import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("results.json", "fastlaplace-digits.pt"):
        for planted in (f"{name}.tmp", f".{name}.tmp"):  # the old fixed name, and a guess at the new one
            (tmp_path / planted).symlink_to(victim)
    atomic_write(tmp_path / "results.json", lambda f: f.write(b"{}"))
    splits = {"train": ImageClasses(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))}
    assert write_cache(tmp_path / "fastlaplace-digits.pt", splits, "source")
    assert victim.read_text() == "keep me"
    assert (tmp_path / "results.json").read_bytes() == b"{}" and (tmp_path / "fastlaplace-digits.pt").stat().st_size
    assert all(p.is_symlink() for p in tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("*tmp"))) == 4
    (tmp_path / "plain.json").write_bytes(b"{}")  # the mode any other written file gets
    assert (tmp_path / "results.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
