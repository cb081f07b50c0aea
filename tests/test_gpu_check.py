"""benchmarks/gpu_check.sh's own logic, on the CPU: every stage's command replaced by a stub
(GPU_CHECK_<STAGE>). Only a failed stage fails the check; a stage left without time is not-run
and does not; what finished stages wrote survives the check being killed."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["preflight", "build", "doctor", "bench_meta", "bench_kernels", "cuda_tests", "memcheck", "racecheck"]
PASSING = {
    "cuda_tests": "echo '3 passed, 1 skipped in 2.0s'",
    "memcheck": "echo '========= ERROR SUMMARY: 0 errors'",
    "racecheck": "echo '========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)'",
}


def check_env(out: Path, budget: int = 300, min_stage: int = 2, **stubs: str) -> dict:
    env = {**os.environ, "OUT": str(out), "BUDGET": str(budget), "GPU_CHECK_MIN_STAGE": str(min_stage)}
    for stage in STAGES:
        env[f"GPU_CHECK_{stage.upper()}"] = stubs.get(stage, PASSING.get(stage, f"echo {stage} done"))
    return env


def run_check(out: Path, **stubs: str) -> tuple[int, dict[str, str]]:
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=check_env(out, **stubs),
                         capture_output=True, text=True, timeout=60)
    return run.returncode, statuses(out)


def statuses(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split()[1] for line in lines if not line.startswith("SUMMARY")}


def test_all_stages_passing_pass(tmp_path):
    rc, status = run_check(tmp_path)
    assert rc == 0 and set(status.values()) == {"pass"} and list(status) == STAGES
    assert "verdict=PASSED" in (tmp_path / "summary.txt").read_text()


@pytest.mark.parametrize("stub", [
    {"doctor": "echo 'verdict: FAILED, 1 of 70 checks disagree'; exit 1"},
    {"cuda_tests": "echo '2 failed, 5 passed in 3s'; exit 1"},
    {"cuda_tests": "echo '9 skipped in 1s'"},  # a GPU that pytest does not see is no pass
    {"memcheck": "echo '========= ERROR SUMMARY: 2 errors'"},
    {"racecheck": "echo '========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)'"},
    {"racecheck": "echo 'no summary at all'"},
], ids=["doctor", "tests", "no-test-passed", "memcheck", "racecheck-errors", "racecheck-no-summary"])
def test_a_failed_stage_fails_the_check(tmp_path, stub):
    rc, status = run_check(tmp_path, **stub)
    (name,) = stub
    assert rc == 1 and status[name] == "fail"
    assert all(s == "pass" for k, s in status.items() if k != name)


def test_racecheck_warnings_alone_pass(tmp_path):
    rc, status = run_check(tmp_path, racecheck="echo 'RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)'")
    assert rc == 0 and status["racecheck"] == "pass"


def test_a_failed_build_stops_and_fails(tmp_path):
    rc, status = run_check(tmp_path, build="exit 2")
    assert rc == 1 and status["build"] == "fail" and status["doctor"] == "not-run"


def test_stages_left_without_time_are_not_run_and_do_not_fail(tmp_path):
    # The script counts whole seconds: the build is left at least 6 of 8 (it needs 5), and
    # then at most 3, fewer than a stage's minimum of 4 (budget 4 with a 3-second build
    # failed when the preflight straddled a second and cut the build's limit to 3).
    rc, status = run_check(tmp_path, budget=8, min_stage=4, build="sleep 5")
    assert rc == 0, status
    assert status["build"] == "pass" and {status[s] for s in STAGES[2:]} == {"not-run"}


def test_a_stage_cut_short_by_the_budget_is_not_run(tmp_path):
    rc, status = run_check(tmp_path, budget=5, doctor="sleep 30")
    assert rc == 0 and status["doctor"] == "not-run", status
    assert "budget" in (tmp_path / "summary.txt").read_text()


def test_a_missing_sanitizer_is_not_run(tmp_path):
    rc, status = run_check(tmp_path, memcheck="", racecheck="")
    assert rc == 0 and status["memcheck"] == status["racecheck"] == "not-run"


def test_finished_stages_survive_a_kill(tmp_path):
    figures = "echo '{\"ok\": true}' > \"$OUT/doctor.json\"; echo 'verdict: OK'"
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, start_new_session=True,
                            env=check_env(tmp_path, doctor=figures, bench_meta="sleep 60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "bench_meta.log").exists():  # the doctor has ended, bench_meta runs
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # what an outer timeout does
        assert proc.wait(timeout=20) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "doctor.json").read_text().strip() == '{"ok": true}'
    status = statuses(tmp_path)
    assert status["doctor"] == "pass" and status["bench_meta"] == "not-run" and status["cuda_tests"] == "not-run"
