"""python -m fastlaplace.doctor: agrees on a good build, exits non-zero when an op disagrees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlaplace import doctor, ops

REPO = Path(__file__).resolve().parents[1]


def test_doctor_from_repository_root_passes_and_writes_json(tmp_path):
    out = tmp_path / "doctor.json"
    run = subprocess.run([sys.executable, "-m", "fastlaplace.doctor", "--device", "cpu", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith("verdict: OK")
    report = json.loads(out.read_text())
    assert report["ok"] and report["build"] == ops.build_info()
    checks = [r for r in report["rows"] if r["ok"] is not None]
    names = {r["check"].split()[0] for r in checks}
    assert names == {"kron_factors", "damped_cholesky", "kron_logdet", "kfac_logdet"}
    assert {r["dtype"] for r in checks} == {"float32", "float64"}
    assert any("composite" in r["check"] for r in checks) and any("fused" in r["check"] for r in checks)
    times = {r["check"]: r["seconds"] for r in report["rows"] if r["ok"] is None}
    assert times["time: sinusoid LLAMA meta-iteration"] > 0 and times["time: same, best plain PyTorch"] > 0


def test_a_disagreeing_op_fails_the_doctor(monkeypatch, capsys):
    wrong = lambda a, g, *args, **kw: ops._ops.kfac_logdet(a, g, float(args[0]), args[1], args[2], True) * 1.01
    monkeypatch.setattr(ops, "kfac_logdet", wrong)
    assert doctor.main(["--device", "cpu", "--checks-only"]) == 1
    out = capsys.readouterr().out
    verdict = out.splitlines()[-1]
    assert verdict.startswith("verdict: FAILED") and "kfac_logdet" in verdict
    assert "FAIL" in out and "kron_logdet exact" not in verdict  # only the broken op


def test_a_raising_op_is_a_failed_check_not_a_crash(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(ops, "damped_cholesky", broken)
    rows = doctor.run([torch.device("cpu")], checks_only=True)
    failed = [r for r in rows if r.ok is False]
    assert failed and all(r.check.startswith("damped_cholesky") and "no kernel" in r.detail for r in failed)


def test_json_path_that_is_a_folder_is_an_error_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--device", "cpu", "--json", str(tmp_path)])
    assert str(exc.value).startswith("error: --json")
