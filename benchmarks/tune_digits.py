"""LLAMA against MAML on digits 5-way K-shot, with LLAMA's η chosen on validation tasks.

    python benchmarks/tune_digits.py                 # 1-shot, η ∈ {1e-8 … 1e-4}, seeds 0 1
    python benchmarks/tune_digits.py --shots 5 --seeds 0 1 2 3 4 --etas 1e-6 --out runs/tune-digits-5shot
    python benchmarks/tune_digits.py --etas 1e-6 --seeds 0 --iterations 50 --tasks 20   # a smoke run

Protocol: LLAMA is trained with the first seed for each (η, τ) of the grid (τ at the paper's
1e-3 unless ``--taus``), each run is scored on ``--tasks`` validation episodes (of the
validation classes, digits 3 and 4 with their rotations, never meta-trained on), and the
(η, τ) with the best validation accuracy is chosen. The
chosen setting, the paper's (η, τ) = (1e-6, 1e-3) and MAML are then trained with every seed of ``--seeds`` and tested on
``--tasks`` test episodes (digits 5-9, never seen in meta-training or selection). Runs go to
``--out``/<method>-eta<η>-tau<τ>-seed<s>; a finished run is reused, so an interrupted sweep
resumes. Writes ``--out``/summary.json and prints a Markdown table: mean ± 95 % CI over
episodes per run, the mean over seeds, and LLAMA − MAML as a paired difference over seeds (both
are tested on the same episodes) with its 95 % t interval.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

PAPER = (1e-6, 1e-3)  # (η, τ) of the paper
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # by freedom


def paired(diffs: list[float]) -> tuple[float, float]:
    """Mean and 95 % t half-width of per-seed differences (NaN half-width for one seed)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, method: str, seed: int, setting: tuple[float, float] | None, args) -> dict:
    """Train one run (reused when its results.json exists) and return its test results."""
    results = out / "results.json"
    if not results.exists():
        cmd = [sys.executable, "-m", "fastlaplace.train", "--dataset", "digits", "--method", method,
               "--seed", str(seed), "--shots", str(args.shots), "--out", str(out), "--eval-tasks", str(args.tasks),
               "--no-progress"]
        if args.iterations is not None:
            cmd += ["--iterations", str(args.iterations)]
        if method == "llama":
            cmd += ["--eta", repr(setting[0]), "--tau", repr(setting[1])]
        if (out / "checkpoint.pt").exists():
            cmd.append("--resume")
        run(cmd)
    return json.loads(results.read_text())["test"]


def validate(out: Path, args) -> dict:
    """Validation accuracy of a finished run (cached in val.json)."""
    cached = out / "val.json"
    if not cached.exists():
        cmd = [sys.executable, "-m", "fastlaplace.evaluate", str(out / "checkpoint.pt"), "--split", "val",
               "--tasks", str(args.tasks)]
        print("+", " ".join(cmd), flush=True)
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        cached.write_text(lines[-1])
    return json.loads(cached.read_text())


def only(estimates: dict) -> dict:
    """The estimate of the single test step count."""
    (est,) = estimates.values()
    return est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--etas", type=float, nargs="+", default=[1e-8, 1e-7, 1e-6, 1e-5, 1e-4])
    p.add_argument("--taus", type=float, nargs="+", default=[1e-3], help="LLAMA's training τ (default: the paper's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--shots", type=int, default=1, help="support images per class (5-way)")
    p.add_argument("--tasks", type=int, default=600, help="validation and test episodes")
    p.add_argument("--iterations", type=int, default=None, help="default: the digits default (1,000)")
    p.add_argument("--out", type=Path, default=Path("runs/tune-digits"))
    args = p.parse_args()

    def llama_dir(setting: tuple[float, float], seed: int) -> Path:
        return args.out / f"llama-eta{setting[0]:g}-tau{setting[1]:g}-seed{seed}"

    val = {}
    for setting in [(eta, tau) for tau in args.taus for eta in args.etas]:
        train(llama_dir(setting, args.seeds[0]), "llama", args.seeds[0], setting, args)
        val[setting] = only(validate(llama_dir(setting, args.seeds[0]), args))
        print(f"validation: η = {setting[0]:g}, τ = {setting[1]:g}: {val[setting]['mean']:.4f} ± "
              f"{val[setting]['ci95']:.4f}", flush=True)
    chosen = max(val, key=lambda k: val[k]["mean"])

    rows = []
    settings = [("MAML", "maml", None), ("LLAMA, the paper's η and τ", "llama", PAPER)]
    if chosen != PAPER:
        settings.append(("LLAMA, η and τ chosen on validation", "llama", chosen))
    for label, method, setting in settings:
        per_seed = []
        for seed in args.seeds:
            out = args.out / f"maml-seed{seed}" if method == "maml" else llama_dir(setting, seed)
            per_seed.append(only(train(out, method, seed, setting, args)))
        rows.append(dict(setting=label, eta=None if setting is None else setting[0],
                         tau=None if setting is None else setting[1], seeds=args.seeds, test=per_seed,
                         mean=sum(e["mean"] for e in per_seed) / len(per_seed)))

    summary = dict(validation=[dict(eta=k[0], tau=k[1], **v) for k, v in val.items()],
                   chosen=dict(eta=chosen[0], tau=chosen[1]), rows=rows,
                   tasks=args.tasks, iterations=args.iterations, shots=args.shots)
    maml = [e["mean"] for e in rows[0]["test"]]
    for r in rows[1:]:
        r["minus_maml"] = dict(zip(("mean", "ci95"), paired([e["mean"] - m for e, m in zip(r["test"], maml)])))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nchosen on validation: η = {chosen[0]:g}, τ = {chosen[1]:g}")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| setting | η | τ | {seeds} | mean over seeds | − MAML (paired) |")
    print("|---|---|---|" + "---|" * len(args.seeds) + "---|---|")
    for r in rows:
        cells = " | ".join(f"{100 * e['mean']:.1f} ± {100 * e['ci95']:.1f} %" for e in r["test"])
        eta = "—" if r["eta"] is None else f"{r['eta']:g}"
        tau = "—" if r["tau"] is None else f"{r['tau']:g}"
        diff = r.get("minus_maml")
        diff = "" if diff is None else f"{100 * diff['mean']:+.1f} ± {100 * diff['ci95']:.1f} points"
        print(f"| {r['setting']} | {eta} | {tau} | {cells} | {100 * r['mean']:.1f} % | {diff} |")


if __name__ == "__main__":
    main()
