"""Bad command lines of every program, as a hostile or careless user types them.

Each line must end in one ``error: ...`` line (the last line of stderr), a non-zero exit
status and no traceback, and leave every file that existed before byte-identical. The lines
run in this process through each program's ``main(argv)`` from a fresh copy of a folder of
small runs and damaged inputs (most fail while the options are checked, so this is fast); a
few run as real processes from the repository root. ``PYTHONPATH=. python
tests/test_bad_command_lines.py`` prints a summary of the outcomes instead of failing at the
first (without ``PYTHONPATH=.``, of the installed fastlaplace).

On the code before their fixes (f3037e7, under ``ulimit -v 10000000``, 20 s a line) 54
of the first 208 lines failed: 10 tracebacks (7 allocations of huge meta-batches, supports or
task counts, 2 integers too large for torch, a JSON file nested 100,000 deep), 7 lines that
changed files (another run's files overwritten, a resume to fewer iterations rewriting the
results and rotating the checkpoints, config.json of a run with NaN parameters rewritten),
4 exit statuses 0 (NaN or infinite parameters evaluated or plotted) and 33 lines still running
(unbounded iterations, inner steps, tasks and samples; uncertainty reports written over their
own inputs; uncertainty of a digits run, which then needed over 13 GB).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import digests

from fastlaplace import evaluate, plot, train, uncertainty
from fastlaplace.config import Config
from fastlaplace.data import convert
from fastlaplace.runs import read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"train": train.main, "evaluate": evaluate.main, "uncertainty": uncertainty.main, "plot": plot.main,
         "convert": convert.main}
SECONDS = 20  # per line: a line still running after this is a failure (an unbounded size or loop)

CK = "{d}/llama/checkpoint.pt"
TINY = "--iterations 1 --meta-batch 1 --eval-tasks 2 --no-progress"
LINES = {
    "train": [
        # values out of range, of the wrong type, not finite, absurdly large
        "--iterations -1", "--iterations 1e3", "--iterations 99999999999", "--meta-batch 0",
        "--meta-batch 1000000000", "--meta-batch 1000000000000000000000", "--support 2000000000", "--support -3",
        "--query-points 2000000000", "--query-points x", "--inner-steps 0", "--inner-steps 100000000",
        "--test-inner-steps 100000000", "--test-inner-steps", "--test-inner-steps 1 -2", "--meta-lr inf",
        "--meta-lr -inf", "--meta-lr 0", "--meta-lr 1e400", "--inner-lr nan", "--inner-lr 0", "--eta inf",
        "--tau inf", "--tau 1e-400", "--x-range 1 1", "--x-range nan 1", "--x-range 1", "--x-range a b",
        "--seed 4611686018427387904", "--seed -4611686018427387905", "--seed 1.5", "--checkpoint-every -1",
        "--log-every -5", "--eval-tasks -1", "--eval-tasks 10000000000", "--support 100000000 --meta-batch 100",
        "--iterations 10000000000000", "--inner-steps 5000 --iterations 1",
        "--test-inner-steps 1 5000000 --iterations 1", "--task-chunk 0", "--task-chunk 1.5",
        "--recompute-query --cuda-graph --device cuda",
        # choices and combinations
        "--dataset digits --ways 0", "--dataset digits --ways 100", "--dataset digits --shots 1000",
        "--dataset digits --query 0", "--dataset digits --filters -1", "--dataset digits --model mlp",
        "--model conv4", "--model resnet50", "--logdet-method cholesky", "--fisher hessian", "--device cuda",
        "--device mps", "--device cuda:-1", "--dataset digits --meta-batch 1000000000",
        "--dataset digits --eval-tasks 0", "--dataset digits --test-inner-steps 100000",
        "--dataset digits --query 100000", "--dataset digits --filters 100000000", "--dataset digits --ways 2 "
        "--shots 1 --query 1 --meta-batch 100000000", "--dataset miniimagenet",
        "--dataset miniimagenet --data-root {d}/llama/checkpoint.pt", "--dataset omniglot --data-root {d}/emptydir",
        "--dataset omniglot --data-root {d}/llama", "--bogus", "--no-progress --resume=1", "--iterations",
        "extra", "--overwrite --resume --out {d}/llama",
        # settings files
        "--config {d}/llama/checkpoint.pt", "--config {d}", "--config {d}/empty.json", "--config {d}/nan.json",
        "--config {d}/null.json", "--config {d}/nested.json", "--config {d}/huge.json", "--config {d}/strlist.json",
        "--config {d}/xrange3.json", "--config {d}/seedfloat.json", "--config {d}/deep.json",
        "--config {d}/outint.json", "--config {d}/binary.json", "--config {d}/hugeint.json",
        "--config {d}/steps.json", "--config {d}/missing.json",
        # output folders: an existing run, a file, another run's files, an input
        "--out {d}/llama", "--out {d}/llama/checkpoint.pt", "--out {d}/stale " + TINY,
        "--out {d}/stale --method maml " + TINY, "--config {d}/stale/config.json --out {d}/stale " + TINY,
        "--out {d}/metricsonly " + TINY, "--out {d}/emptyfile " + TINY,
        # resuming
        "--resume --out {d}/llama --iterations 1 --eval-tasks 2 --no-progress",
        "--resume --out {d}/llama --iterations 1", "--resume --out {d}/llama --meta-batch 7",
        "--resume --out {d}/llama --seed 5", "--resume --out {d}/llama --dataset digits",
        "--resume --out {d}/llama --device banana", "--resume --out {d}/llama --iterations 100000000000",
        "--resume --out {d}/llama --inner-steps 100000", "--resume --out {d}/nanrun --iterations 3",
        "--resume --out {d}/truncrun --iterations 3", "--resume --out {d}/badconfigrun --iterations 3",
        "--resume --out {d}/llama --config {d}/nan.json", "--resume --out {d}/corruptrun --meta-batch 7",
    ],
    "evaluate": [
        CK + " --steps 100000000", CK + " --steps 1 100000000", CK + " --steps -1", CK + " --steps x",
        CK + " --steps", CK + " --tasks 0", CK + " --tasks -1", CK + " --tasks 10000000000", CK + " --tasks 1e3",
        CK + " --split validation", CK + " --seed 4611686018427387904", CK + " --seed x", CK + " --device cuda",
        CK + " --device ''", CK + " extra", CK + " --allow-pickle=yes", "--tasks 5", "",
        "{d}/nan.pt", "{d}/inf.pt", "{d}/optnan.pt", "{d}/trunc.pt", "{d}/empty.pt", "{d}/dir.pt", "{d}/llama",
        "{d}/llama/metrics.jsonl", "{d}/llama/results.json", "{d}/mismatch.pt", "{d}/noconfig.pt",
        "{d}/wrongcfg.pt", "{d}/cudacfg.pt", "{d}/digits/checkpoint.pt --steps 100000",
        "{d}/digits/checkpoint.pt --tasks 0", "{d}/digits/checkpoint.pt --tasks 100000000000",
    ],
    "uncertainty": [
        CK + " --json " + CK, CK + " --json {d}/llama/checkpoint.prev.pt", CK + " --json {d}/llama/config.json",
        CK + " --json {d}/llama/results.json", CK + " --json {d}/llama/metrics.jsonl",
        CK + " --json llama/../llama/checkpoint.pt", CK + " --json link/checkpoint.pt",
        "llama/checkpoint.pt --json ./llama/checkpoint.pt",
        CK + " --maml {d}/maml/checkpoint.pt --json {d}/maml/checkpoint.pt",
        CK + " --maml {d}/maml/checkpoint.pt --json {d}/maml/config.json", CK + " --json {d}/llama",
        CK + " --json {d}/nowhere/x.json", CK + " --tasks 10000000000", CK + " --tasks 100000000",
        CK + " --samples 10000000", CK + " --samples 1000000000", CK + " --samples -1", CK + " --tau inf",
        CK + " --tau -inf", CK + " --tau 1e400", CK + " --tau x", CK + " --prior bogus", CK + " --method bogus",
        CK + " --maml {d}/nan.pt", CK + " --maml {d}/digits/checkpoint.pt --tasks 2 --samples 2",
        CK + " --maml {d}/llama", CK + " --maml {d}/trunc.pt", CK + " --tasks 2 --samples 100000000",
        "{d}/nan.pt", "{d}/inf.pt", "{d}/trunc.pt", "{d}/dir.pt", "{d}/maml/checkpoint.pt",
        "{d}/digits/checkpoint.pt --sampled-networks", "{d}/digits/checkpoint.pt --maml {d}/maml/checkpoint.pt",
        "{d}/digits/checkpoint.pt --samples 1", "",
    ],
    "plot": [
        "posterior " + CK + " --out " + CK + " --tau 1", "posterior " + CK + " --out {d}/llama/config.json --tau 1",
        "posterior " + CK + " --out llama/../llama/checkpoint.prev.pt --tau 1",
        "posterior " + CK + " --out link/checkpoint.pt --tau 1",
        "posterior " + CK + " --maml {d}/maml/checkpoint.pt --out {d}/maml/checkpoint.pt --tau 1",
        "curves {d}/llama --out {d}/llama/metrics.jsonl", "curves {d}/llama --out {d}/llama/results.json",
        "curves {d}/llama --out {d}/llama", "curves link --out llama/metrics.jsonl",
        "curves {d}/llama --out {d}/llama/checkpoint.pt", "posterior {d}/nan.pt --tau 1",
        "posterior {d}/inf.pt --tau 1", "posterior {d}/trunc.pt", "posterior {d}/dir.pt",
        "posterior {d}/digits/checkpoint.pt --tau 1", "posterior " + CK + " --steps 100000000 --tau 1",
        "posterior " + CK + " --tau inf", "posterior " + CK + " --seed x",
        "posterior " + CK + " --maml {d}/digits/checkpoint.pt --tau 1",
        "posterior " + CK + " --maml {d}/nan.pt --tau 1",
        "reliability " + CK, "reliability {d}/digits/checkpoint.pt --out {d}/digits/checkpoint.pt",
        "reliability {d}/digits/checkpoint.pt --tasks 0", "reliability {d}/digits/checkpoint.pt --samples 1",
        "reliability {d}/digits/checkpoint.pt --maml " + CK, "reliability {d}/nan.pt",
        "curves {d}/llama/checkpoint.pt", "curves {d}/stringmetrics", "curves", "posterior", "histogram {d}/llama",
        "posterior {d}/maml/checkpoint.pt --tau 1", "posterior " + CK + " --method bogus",
    ],
    "convert": [
        "{d}/llama/checkpoint.pt", "{d}/llama", "{d}/badpkl", "{d}/emptypkl", "", "{d}/a {d}/b", "{d}/brokenlink",
        "{d}/wrongpkl", "--bogus {d}/badpkl",
    ],
}
# Two of the lines above again as real processes started from the repository root (tests/test_cli.py
# runs its hostile command lines so).
PROCESSES = [("plot", "curves {d}/llama --out {d}/llama/metrics.jsonl"), ("convert", "{d}/llama/checkpoint.pt")]


def _write_json(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def build_template(d: Path) -> Path:
    """Small runs (LLAMA and MAML on sinusoids, LLAMA on digits) and damaged inputs."""
    common = dict(iterations=2, meta_batch=2, eval_tasks=4, checkpoint_every=1)
    for name, extra in (("llama", {}), ("maml", {"method": "maml"}),
                        ("digits", dict(dataset="digits", filters=2, test_inner_steps=[1]))):
        train.train(Config(**{**common, **extra, "out": str(d / name)}), progress=False)
    state = read_checkpoint(d / "llama" / "checkpoint.pt")

    def damaged(path: Path, change) -> None:
        s = read_checkpoint(d / "llama" / "checkpoint.pt")
        change(s)
        save_checkpoint(path, s)

    first = next(iter(state["learner"]))
    damaged(d / "nan.pt", lambda s: s["learner"][first].view(-1)[0].fill_(float("nan")))
    damaged(d / "inf.pt", lambda s: s["learner"][first].view(-1)[-1].fill_(float("-inf")))
    damaged(d / "optnan.pt", lambda s: s["optimizer"]["state"][0]["exp_avg"].fill_(float("nan")))
    damaged(d / "mismatch.pt", lambda s: s["learner"].update({first: torch.zeros(3, 3)}))
    damaged(d / "noconfig.pt", lambda s: s.pop("config"))
    damaged(d / "wrongcfg.pt", lambda s: s["config"].update(iterations="many"))
    damaged(d / "cudacfg.pt", lambda s: s["config"].update(device="cuda:5"))
    data = (d / "llama" / "checkpoint.pt").read_bytes()
    (d / "trunc.pt").write_bytes(data[: len(data) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "dir.pt").mkdir()
    (d / "emptydir").mkdir()
    (d / "emptyfile").write_bytes(b"")
    (d / "link").symlink_to("llama")
    (d / "brokenlink").symlink_to("nowhere")
    for name in ("nanrun", "truncrun", "badconfigrun", "corruptrun"):
        shutil.copytree(d / "llama", d / name)
    (d / "corruptrun" / "checkpoint.pt").write_bytes(data[:1000])  # its previous checkpoint is intact
    shutil.copy(d / "nan.pt", d / "nanrun" / "checkpoint.pt")
    shutil.copy(d / "nan.pt", d / "nanrun" / "checkpoint.prev.pt")
    (d / "truncrun" / "checkpoint.pt").write_bytes(data[:1000])
    (d / "truncrun" / "checkpoint.prev.pt").unlink()
    _write_json(d / "badconfigrun" / "config.json", {"iterations": [1]})
    (d / "stale").mkdir()  # another run's files, no checkpoint
    for name in ("results.json", "metrics.jsonl", "config.json"):
        shutil.copy(d / "llama" / name, d / "stale" / name)
    (d / "metricsonly").mkdir()
    shutil.copy(d / "llama" / "metrics.jsonl", d / "metricsonly" / "metrics.jsonl")
    (d / "stringmetrics").mkdir()
    (d / "stringmetrics" / "metrics.jsonl").write_text('{"iteration": 1, "query_loss": "low"}\n')
    for name, value in {"empty.json": "", "nan.json": '{"meta_lr": NaN}', "null.json": {"dataset": None},
                        "nested.json": {"iterations": {"a": 1}}, "huge.json": '{"iterations": 1e400}',
                        "strlist.json": {"test_inner_steps": ["1"]}, "xrange3.json": {"x_range": [1, 2, 3]},
                        "seedfloat.json": {"seed": 1.0}, "deep.json": "[" * 100000 + "]" * 100000,
                        "outint.json": {"out": 5}, "hugeint.json": {"meta_batch": 10**30},
                        "steps.json": {"test_inner_steps": [10**9]}}.items():
        _write_json(d / name, value)
    (d / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    for name, content in (("badpkl", b"\x80\x04N."), ("emptypkl", b""), ("wrongpkl", None)):
        (d / name).mkdir()
        for split in ("train", "validation", "test"):
            path = d / name / f"mini-imagenet-cache-{split}.pkl"
            if content is None:  # a pickle of the wrong shape (a list), loaded only because convert allows pickles
                import pickle

                path.write_bytes(pickle.dumps([1, 2, 3]))
            else:
                path.write_bytes(content)
    return d


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_in_process(program: str, argv: list[str]) -> tuple[int | str | None, str]:
    """(exit status or message, stderr) of ``program``'s main; a traceback's text is in stderr."""
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            MAINS[program](argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except Hang:
        return "hang", err.getvalue()
    except BaseException as exc:  # a traceback: what the line must never give
        import traceback

        return 1, err.getvalue() + "Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if isinstance(code, str):  # what Python prints for SystemExit("...") on its way out
        return 1, err.getvalue() + code + "\n"
    return code, err.getvalue()


def verdict(code, err: str, before: dict, after: dict) -> str:
    """'ok', or what is wrong with a bad line's outcome."""
    changed = sorted(k for k in before if after.get(k) != before[k])
    if code == "hang":
        return f"still running after {SECONDS} s"
    if "Traceback" in err:
        return "traceback: " + err.strip().splitlines()[-1][:200]
    if changed:
        return f"changed {changed}"
    if code in (0, None):
        return "exit status 0"
    errors = [line for line in err.splitlines() if "error:" in line]
    if len(errors) != 1 or err.strip().splitlines()[-1] != errors[0]:
        return "not one final error line: " + err.strip()[-200:]
    return "ok"


def argv_of(line: str, d: Path) -> list[str]:
    return [a.replace("''", "") for a in line.format(d=d).split()]


def listing(d: Path) -> tuple[dict[str, str], list[str]]:
    """The digest of every file under ``d`` and every folder's path."""
    return digests(d), sorted(str(Path(parent).relative_to(d)) for parent, _, _ in os.walk(d))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The folder of runs and damaged inputs, and a working copy of it with its listing."""
    base = tmp_path_factory.mktemp("bad-lines")
    build_template(base / "template")
    shutil.copytree(base / "template", base / "d", symlinks=True)
    return base / "template", base / "d", listing(base / "d")


@pytest.fixture
def folder(template, monkeypatch):
    """The working copy, as the working directory (relative paths are relative to it); made
    anew from the template after a line that changed anything in it."""
    source, d, pristine = template
    monkeypatch.chdir(d)
    yield d
    if listing(d) != pristine:
        shutil.rmtree(d)
        shutil.copytree(source, d, symlinks=True)


ALL = [(program, line) for program, lines in LINES.items() for line in lines]


def test_there_are_enough_lines():
    assert len(ALL) >= 150 and len(set(ALL)) == len(ALL)


@pytest.mark.parametrize("program, line", ALL)
def test_bad_line(folder, program, line):
    before = digests(folder)
    code, err = run_in_process(program, argv_of(line, folder))
    assert verdict(code, err, before, digests(folder)) == "ok", err


@pytest.mark.parametrize("program, line", PROCESSES)
def test_bad_line_in_a_real_process(folder, program, line):
    before = digests(folder)
    module = "fastlaplace.data.convert" if program == "convert" else f"fastlaplace.{program}"
    run = subprocess.run([sys.executable, "-m", module, *argv_of(line, folder)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert verdict(run.returncode, run.stderr, before, digests(folder)) == "ok", run.stderr


def summary() -> None:
    """Every line's outcome, each in a forked child (so that a line that runs out of memory or
    is stopped mid-way cannot disturb the next: run it under ``ulimit -v`` on old code)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        template_dir = build_template(Path(tmp) / "template")
        counts: dict[str, int] = {}
        for i, (program, line) in enumerate(ALL):
            d = Path(tmp) / f"run{i}"
            shutil.copytree(template_dir, d, symlinks=True)
            read, write = os.pipe()
            if os.fork() == 0:  # the child runs the line and writes its verdict
                os.chdir(d)
                before = digests(d)
                code, err = run_in_process(program, argv_of(line, d))
                os.write(write, verdict(code, err, before, digests(d)).encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read) as f:
                outcome = f.read() or "the process died"
            os.wait()
            shutil.rmtree(d)
            kind = outcome.split(":")[0] if outcome.startswith(("traceback", "not one")) else outcome.split(" [")[0]
            counts[kind] = counts.get(kind, 0) + 1
            if outcome != "ok":
                print(f"{program} {line}\n    {outcome}", flush=True)
        print(counts, f"of {len(ALL)} lines")


if __name__ == "__main__":
    summary()
