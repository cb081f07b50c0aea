"""Meta-training over processes (torch.distributed, Gloo on the CPU, 2 processes under torchrun):
the averaged meta-gradient equals the one-process one, a killed 2-rank run resumes to the same
parameters, a rank that dies ends the job with an error and an intact checkpoint."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlaplace import distributed
from fastlaplace.config import Config
from fastlaplace.runs import read_checkpoint
from fastlaplace.train import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TRAIN = ["--iterations", "8", "--meta-batch", "4", "--checkpoint-every", "2", "--log-every", "1", "--eval-tasks",
         "20", "--eta", "1e-3", "--tau", "0.1", "--val-every", "3", "--val-tasks", "10", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd, env=None, wait=True):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *map(str, args)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    return finish(process) if wait else process


def finish(process):
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_two_ranks_average_to_the_one_process_meta_gradient(tmp_path):
    run = torchrun(WORKER, "equivalence", tmp_path / "report.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for method in ("maml", "llama"):  # float64, the same six tasks split 3 + 3
        assert report[method + "_scale"] > 1e-3 and report[method] <= 1e-6 * report[method + "_scale"], report
    assert report["evaluation_equal"] and report["evaluation_n"] == 250, report
    assert report["evaluation_grouped_equal"], report
    # the group is gone, its threads joined, before the interpreter finalises (a thread still
    # freeing a tensor there aborts the process: "terminate called without an active exception")
    if sys.platform == "linux":
        assert report["threads_after_shutdown"] == [], report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-rank run, and one whose rank 1 dies during iteration 6 (then resumed)."""
    base = tmp_path_factory.mktemp("dist")
    straight = torchrun("-m", "fastlaplace.train", *TRAIN, "--out", base / "straight", cwd=base, wait=False)
    crashed = torchrun(WORKER, "train", *TRAIN, "--out", base / "crashed", cwd=base,
                       env={"CRASH_AT": "6", "CRASH_RANK": "1"})  # at the same time, on other ports
    straight = finish(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    after_crash = read_checkpoint(base / "crashed" / "checkpoint.pt")
    resumed = torchrun("-m", "fastlaplace.train", *TRAIN, "--out", base / "crashed", "--resume", cwd=base)
    return dict(base=base, straight=straight, crashed=crashed, after_crash=after_crash, resumed=resumed)


def test_two_rank_run_writes_once_and_saves_every_rank_generator(runs):
    out = runs["base"] / "straight"
    assert "test mse after 1 inner step(s)" in runs["straight"].stdout
    lines = runs["straight"].stdout.splitlines()
    assert sum(line.startswith("test mse after 1 inner step(s)") for line in lines) == 1  # rank 0 alone reports
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["iteration"] for r in rows if "val_mse" in r] == [0, 3, 6]  # validated by both ranks, logged once
    best = read_checkpoint(out / "best.pt")
    assert best["validation"]["n"] == 10 and best["iteration"] in (0, 3, 6)
    assert runs["straight"].stdout.count("best.pt (iteration") == 2  # rank 0 alone, after 1 and 10 steps
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and state["iteration"] == 8
    assert state["task_generators"].shape[0] == 2 and state["task_generators"].dtype == torch.uint8
    assert not torch.equal(state["task_generators"][0], state["task_generators"][1])
    assert json.loads((out / "results.json").read_text())["test"]["1"]["n"] == 20


def test_dead_rank_ends_the_job_with_an_error_and_keeps_the_checkpoint(runs):
    crashed = runs["crashed"]
    assert crashed.returncode != 0
    assert "error: simulated failure of rank 1 at meta-batch 6" in crashed.stderr
    assert "error: rank 0: averaging the meta-gradients with the other ranks failed" in crashed.stderr
    assert runs["after_crash"]["iteration"] == 4  # the last checkpoint before the failure, intact
    assert not list((runs["base"] / "crashed").glob("*.tmp"))


def test_killed_two_rank_run_resumes_to_the_uninterrupted_result(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    assert "resumed from" in runs["resumed"].stderr
    a = read_checkpoint(runs["base"] / "straight" / "checkpoint.pt")
    b = read_checkpoint(runs["base"] / "crashed" / "checkpoint.pt")
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    assert torch.equal(a["task_generators"], b["task_generators"])
    results = [json.loads((runs["base"] / name / "results.json").read_text()) for name in ("straight", "crashed")]
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["best"] == results[1]["best"]  # the best so far survived the crash
    rows = [json.loads(line) for line in open(runs["base"] / "crashed" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "val_mse" in r] == [0, 3, 6]


def test_one_process_resumes_a_two_rank_run(runs, tmp_path, capsys):
    shutil.copytree(runs["base"] / "straight", tmp_path / "copy")  # the fixture's runs stay as they are
    cfg = Config(out=str(tmp_path / "copy"), iterations=10, eval_tasks=10, checkpoint_every=2, log_every=1,
                 meta_batch=4, eta=1e-3, tau=0.1)
    train(cfg, resume=True, progress=False)
    assert "seeded anew from (seed, rank, iteration 8)" in capsys.readouterr().err
    state = read_checkpoint(tmp_path / "copy" / "checkpoint.pt")
    assert state["iteration"] == 10 and "world_size" not in state


def test_meta_batch_must_divide_by_the_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="meta-batch of 5 tasks does not divide among 2 processes"):
        train(Config(out=str(tmp_path / "r"), meta_batch=5, iterations=1), progress=False)
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "r").exists()


def test_one_process_never_calls_torch_distributed(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called in a one-process run")

    for name in ("init_process_group", "all_reduce", "all_gather", "broadcast_object_list"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    train(Config(out=str(tmp_path / "r"), meta_batch=3, iterations=2, eval_tasks=5), progress=False)
    assert "world_size" not in read_checkpoint(tmp_path / "r" / "checkpoint.pt")


def test_context_sharding_and_seeds():
    assert distributed.from_env({}) == distributed.Context(0, 1, 0)
    ctx = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.distributed) == (3, 4, 1, False, True)
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert distributed.local_tasks(12, 4) == 3
    batch = (torch.arange(12).reshape(12, 1), torch.arange(12))
    assert distributed.shard(batch, ctx)[1].tolist() == [9, 10, 11]
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:0") == "nccl"
    assert distributed.local_device("cuda", ctx) == "cuda:1" and distributed.local_device("cpu", ctx) == "cpu"
    seeds = {distributed.rank_seed(0, r, i) for r in range(4) for i in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.average_gradients([], torch.ones(2)).tolist() == [1.0, 1.0]  # one process: nothing to do


def test_a_session_leaves_only_the_group_it_joined(monkeypatch):
    """One process: nothing joined, nothing left. A group joined before the session (by the
    caller's own code) is still there after it."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session() as ctx:
        assert ctx == distributed.Context() and not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with distributed.session() as ctx:
            assert ctx.world_size == 1
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
